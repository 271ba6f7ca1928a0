//! A small ABI encoder for calling the test contract with any values
//! (strings that are not UTF-8 included): enough for its functions.

/// One argument.
pub enum Arg {
    /// A static 32-byte word (uint, int, address, bool, bytes32, …).
    Word([u8; 32]),
    /// Dynamic bytes (`string` or `bytes`): any bytes at all.
    Bytes(Vec<u8>),
    /// A dynamic array of static words.
    Words(Vec<[u8; 32]>),
}

pub fn uint(v: u128) -> Arg {
    Arg::Word(word_u(v))
}

pub fn int(v: i128) -> Arg {
    let mut w = if v < 0 { [0xff; 32] } else { [0; 32] };
    w[16..].copy_from_slice(&v.to_be_bytes());
    Arg::Word(w)
}

pub fn boolean(v: bool) -> Arg {
    uint(u128::from(v))
}

pub fn address(hex0x: &str) -> Arg {
    let mut w = [0u8; 32];
    hex::decode_to_slice(hex0x.trim_start_matches("0x"), &mut w[12..]).expect("address");
    Arg::Word(w)
}

pub fn word_u(v: u128) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[16..].copy_from_slice(&v.to_be_bytes());
    w
}

/// The calldata of `method_id` (8 hex digits) with `args`.
pub fn calldata(method_id: &str, args: &[Arg]) -> String {
    let head_len = args.len() * 32;
    let mut head = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    for a in args {
        match a {
            Arg::Word(w) => head.extend_from_slice(w),
            Arg::Bytes(b) => {
                head.extend_from_slice(&word_u((head_len + tail.len()) as u128));
                tail.extend_from_slice(&word_u(b.len() as u128));
                tail.extend_from_slice(b);
                tail.resize(tail.len() + (32 - b.len() % 32) % 32, 0);
            }
            Arg::Words(ws) => {
                head.extend_from_slice(&word_u((head_len + tail.len()) as u128));
                tail.extend_from_slice(&word_u(ws.len() as u128));
                for w in ws {
                    tail.extend_from_slice(w);
                }
            }
        }
    }
    format!("0x{method_id}{}{}", hex::encode(head), hex::encode(tail))
}
