use super::*;
use crate::types::Address;
use ethers::abi::{encode, Token};
use ethers::types::{H160, U256};
use serde_json::json;

const BURNED: &str = "event Burned(address indexed from, uint256 amount)";
const RICH: &str = "event Rich(address indexed to, int256 indexed delta, uint256 id, int64 small, bytes32 tag, bool flag, string note, bytes blob, uint256[] list, (uint256,address) pair)";

fn set(sigs: &[&str]) -> EventSet {
    let owned: Vec<String> = sigs.iter().map(|s| s.to_string()).collect();
    EventSet::parse(&owned).expect("valid signatures")
}

fn topic(bytes: [u8; 32]) -> Hash32 {
    Hash32(bytes)
}

fn addr_topic(a: [u8; 20]) -> Hash32 {
    let mut t = [0u8; 32];
    t[12..].copy_from_slice(&a);
    Hash32(t)
}

fn log(topics: Vec<Hash32>, data: Vec<u8>) -> RawLog {
    RawLog {
        block_number: 7,
        block_hash: Hash32([1; 32]),
        tx_hash: Hash32([2; 32]),
        log_index: 3,
        address: Address([9; 20]),
        topics,
        data,
        removed: false,
    }
}

#[test]
fn burned_decodes_to_named_params_with_decimal_amount() {
    let s = set(&[BURNED]);
    let t0 = s.topic0s()[0];
    // keccak256("Burned(address,uint256)")
    assert_eq!(
        t0.to_string(),
        format!("0x{}", hex::encode(ethers::utils::keccak256("Burned(address,uint256)")))
    );
    let amount = U256::MAX - 1; // beyond f64 and i64: must survive as text
    let d = s
        .decode(&log(vec![t0, addr_topic([0xab; 20])], encode(&[Token::Uint(amount)])))
        .expect("decodes");
    assert_eq!(d.event_name, "Burned");
    assert_eq!(
        d.params,
        json!({"from": format!("0x{}", "ab".repeat(20)), "amount": amount.to_string()})
    );
}

#[test]
fn every_abi_type_has_its_json_encoding() {
    let s = set(&[RICH]);
    let t0 = s.topic0s()[0];
    let minus_five = I256::from(-5).into_raw();
    let data = encode(&[
        Token::Uint(U256::from(42)),
        Token::Int(I256::from(-7).into_raw()),
        Token::FixedBytes(vec![0x11; 32]),
        Token::Bool(true),
        Token::String("héllo".into()),
        Token::Bytes(vec![0xde, 0xad]),
        Token::Array(vec![Token::Uint(1.into()), Token::Uint(2.into())]),
        Token::Tuple(vec![Token::Uint(3.into()), Token::Address(H160([0xcd; 20]))]),
    ]);
    let mut delta = [0u8; 32];
    minus_five.to_big_endian(&mut delta);
    let d = s
        .decode(&log(vec![t0, addr_topic([0xab; 20]), topic(delta)], data))
        .expect("decodes");
    assert_eq!(
        d.params,
        json!({
            "to": format!("0x{}", "ab".repeat(20)),
            "delta": "-5",
            "id": "42",
            "small": "-7",
            "tag": format!("0x{}", "11".repeat(32)),
            "flag": true,
            "note": "héllo",
            "blob": "0xdead",
            "list": ["1", "2"],
            "pair": ["3", format!("0x{}", "cd".repeat(20))],
        })
    );
}

#[test]
fn wrong_topic_count_truncated_data_and_unknown_topic_are_errors_not_panics() {
    let s = set(&[BURNED]);
    let t0 = s.topic0s()[0];
    let good_data = encode(&[Token::Uint(1.into())]);
    let missing_topic = s.decode(&log(vec![t0], good_data.clone()));
    assert!(
        matches!(&missing_topic, Err(DecodeError::Layout { reason, .. }) if reason.contains("expected 2 topics, log has 1")),
        "{missing_topic:?}"
    );
    let extra_topic = s.decode(&log(
        vec![t0, addr_topic([1; 20]), addr_topic([2; 20])],
        good_data.clone(),
    ));
    assert!(matches!(extra_topic, Err(DecodeError::Layout { .. })));
    let truncated = s.decode(&log(vec![t0, addr_topic([1; 20])], good_data[..20].to_vec()));
    assert!(matches!(truncated, Err(DecodeError::Layout { .. })), "{truncated:?}");
    assert_eq!(
        s.decode(&log(vec![Hash32([5; 32])], good_data.clone())),
        Err(DecodeError::UnknownTopic(Hash32([5; 32])))
    );
    assert_eq!(s.decode(&log(vec![], good_data)), Err(DecodeError::NoTopics));
}

#[test]
fn same_topic0_with_different_indexing_picks_the_layout_that_fits() {
    let erc20 = "event Transfer(address indexed from, address indexed to, uint256 value)";
    let erc721 = "event Transfer(address indexed from, address indexed to, uint256 indexed tokenId)";
    let s = set(&[erc20, erc721]);
    assert_eq!(s.topic0s().len(), 1);
    let t0 = s.topic0s()[0];
    let mut id = [0u8; 32];
    id[31] = 9;
    let nft = s
        .decode(&log(
            vec![t0, addr_topic([1; 20]), addr_topic([2; 20]), topic(id)],
            vec![],
        ))
        .expect("erc721 layout");
    assert_eq!(nft.params["tokenId"], json!("9"));
    let token = s
        .decode(&log(
            vec![t0, addr_topic([1; 20]), addr_topic([2; 20])],
            encode(&[Token::Uint(5.into())]),
        ))
        .expect("erc20 layout");
    assert_eq!(token.params["value"], json!("5"));
}

#[test]
fn bad_signatures_are_reported_by_index() {
    let sigs: Vec<String> = vec![
        BURNED.into(),
        "event Broken(address indexed".into(),
        "event Anon(uint256 x) anonymous".into(),
        BURNED.into(),
    ];
    let errs = EventSet::parse(&sigs).expect_err("invalid");
    let idx: Vec<usize> = errs.iter().map(|(i, _)| *i).collect();
    assert_eq!(idx, vec![1, 2, 3], "{errs:?}");
    assert!(errs[1].1.contains("anonymous"));
    assert!(errs[2].1.contains("listed twice"));
}

#[test]
fn unnamed_parameters_get_positional_names() {
    let s = set(&["event Pair(uint256, uint256)"]);
    let t0 = s.topic0s()[0];
    let d = s
        .decode(&log(vec![t0], encode(&[Token::Uint(1.into()), Token::Uint(2.into())])))
        .expect("decodes");
    assert_eq!(d.params, json!({"arg0": "1", "arg1": "2"}));
}

#[test]
fn a_string_jsonb_cannot_hold_is_kept_as_its_exact_bytes_and_valid_utf8_exactly_as_emitted() {
    const NOTE: &str = "event Note(string text, string[] many, (string,uint256) pair)";
    let s = set(&[NOTE]);
    let t0 = s.topic0s()[0];
    let nul = b"pay\0me".to_vec();
    let invalid = vec![0x66, 0x6f, 0xff, 0xfe];
    let fine = "ok ✓ \u{1F600}".as_bytes().to_vec();
    // `string` and `bytes` share one ABI encoding: emit raw bytes as strings.
    let data = encode(&[
        Token::Bytes(nul.clone()),
        Token::Array(vec![Token::Bytes(fine.clone()), Token::Bytes(invalid.clone())]),
        Token::Tuple(vec![Token::Bytes(nul.clone()), Token::Uint(1.into())]),
    ]);
    let d = s.decode(&log(vec![t0], data)).expect("decodes");
    let raw = |b: &[u8]| json!({ "bytes": format!("0x{}", hex::encode(b)) });
    assert_eq!(
        d.params,
        json!({
            "text": raw(&nul),
            "many": ["ok ✓ \u{1F600}", raw(&invalid)],
            "pair": [raw(&nul), "1"],
        })
    );
    // What is stored is what jsonb accepts: no U+0000 anywhere in the text.
    assert!(!d.params.to_string().contains("\\u0000"));
}
