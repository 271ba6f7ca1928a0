//! Proxies at the TCP level: [`TcpProxy`] cuts every connection through it
//! and refuses new ones until restored (a WebSocket endpoint going away and
//! coming back); [`PgTap`] sits in front of PostgreSQL and counts what a
//! client asks for: the most `SAVEPOINT`s any one of its transactions took,
//! and can cut or hold one statement.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy that can cut every connection through it and refuse new
/// ones until restored: a WebSocket endpoint going away and coming back.
pub struct TcpProxy {
    pub port: u16,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (r, c) = (Arc::clone(&refusing), Arc::clone(&connections));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if r.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task);
            }
        });
        TcpProxy {
            port,
            refusing,
            connections,
            accept,
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.refusing.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Connections accepted and passed on since the start (or the last cut).
    pub fn accepted(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A TCP proxy in front of PostgreSQL that reads what its clients send
/// (the frontend half of the wire protocol: simple queries and Parse
/// messages) and counts the `SAVEPOINT`s of each transaction; it keeps the
/// most that any one transaction took.
pub struct PgTap {
    pub port: u16,
    most: Arc<std::sync::atomic::AtomicU32>,
    /// The next statement containing this (upper case) closes its
    /// connection instead of reaching the server (the server going away),
    /// or reaches it only after a pause (a client that stalls).
    cut_on: Arc<Mutex<Option<(String, Trap)>>>,
    cuts: Arc<std::sync::atomic::AtomicU32>,
    accept: tokio::task::JoinHandle<()>,
}

impl PgTap {
    /// A tap in front of the server `db_url` names.
    pub async fn start(db_url: &str) -> PgTap {
        let u = url::Url::parse(db_url).expect("database url");
        let upstream = format!("{}:{}", u.host_str().expect("host"), u.port().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let most = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let cut_on: Arc<Mutex<Option<(String, Trap)>>> = Arc::default();
        let cuts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (m, c, n) = (Arc::clone(&most), Arc::clone(&cut_on), Arc::clone(&cuts));
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let counters = (Arc::clone(&m), Arc::clone(&c), Arc::clone(&n));
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&upstream).await {
                        let _ = tap(inbound, outbound, counters).await;
                    }
                });
            }
        });
        PgTap {
            port,
            most,
            cut_on,
            cuts,
            accept,
        }
    }

    /// The next statement containing `sql` closes its connection instead.
    pub fn cut_once_on(&self, sql: &str) {
        *self.cut_on.lock().expect("cut lock") = Some((sql.to_uppercase(), Trap::Cut));
    }

    /// The next statement containing `sql` reaches the server `after` a
    /// pause: its session sits idle meanwhile, as if its client froze.
    pub fn delay_once_on(&self, sql: &str, after: Duration) {
        *self.cut_on.lock().expect("cut lock") = Some((sql.to_uppercase(), Trap::Delay(after)));
    }

    /// Connections closed by [`PgTap::cut_once_on`].
    pub fn cuts(&self) -> u32 {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `db_url` through the tap.
    pub fn url(&self, db_url: &str) -> String {
        let mut u = url::Url::parse(db_url).expect("database url");
        u.set_port(Some(self.port)).expect("port");
        u.to_string()
    }

    /// The most `SAVEPOINT`s one transaction has taken so far.
    pub fn most_savepoints(&self) -> u32 {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for PgTap {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What [`PgTap`] does to a statement it was told to watch for.
#[derive(Clone, Copy)]
enum Trap {
    Cut,
    Delay(Duration),
}

type TapState = (
    Arc<std::sync::atomic::AtomicU32>,
    Arc<Mutex<Option<(String, Trap)>>>,
    Arc<std::sync::atomic::AtomicU32>,
);

/// Copies both ways; reads the client's messages on the way.
async fn tap(inbound: TcpStream, outbound: TcpStream, (most, cut_on, cuts): TapState) -> std::io::Result<()> {
    let (mut client_rx, mut client_tx) = inbound.into_split();
    let (mut server_rx, mut server_tx) = outbound.into_split();
    let down = tokio::spawn(async move { tokio::io::copy(&mut server_rx, &mut client_tx).await });
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16384];
    let (mut started, mut savepoints) = (false, 0u32);
    loop {
        let n = client_rx.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let (mut cut, mut pause) = (false, None);
        loop {
            // Before start-up completes, messages have no type byte.
            let skip = usize::from(started);
            let Some(len) = buf
                .get(skip..skip + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            else {
                break;
            };
            if buf.len() < skip + len {
                break;
            }
            let message: Vec<u8> = buf.drain(..skip + len).collect();
            if !started {
                // SSLRequest and GSSENCRequest come before the startup message.
                let code = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                started = !matches!(code, 80_877_103 | 80_877_104);
                continue;
            }
            let sql = match message[0] {
                b'Q' => &message[5..],
                // Parse: the statement's name, then its text.
                b'P' => match message[5..].iter().position(|b| *b == 0) {
                    Some(i) => &message[5 + i + 1..],
                    None => continue,
                },
                _ => continue,
            };
            let sql = String::from_utf8_lossy(sql.split(|b| *b == 0).next().unwrap_or_default()).to_uppercase();
            let mut wanted = cut_on.lock().expect("cut lock");
            if let Some((_, trap)) = wanted.as_ref().filter(|(w, _)| sql.contains(w.as_str())) {
                match *trap {
                    Trap::Cut => {
                        cut = true;
                        cuts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Trap::Delay(d) => pause = Some(d),
                }
                *wanted = None;
            }
            drop(wanted);
            for statement in sql.split(';').map(str::trim) {
                if statement.starts_with("SAVEPOINT") {
                    savepoints += 1;
                    most.fetch_max(savepoints, std::sync::atomic::Ordering::SeqCst);
                } else if matches!(statement, "COMMIT" | "ROLLBACK" | "BEGIN")
                    || statement.starts_with("START TRANSACTION")
                {
                    savepoints = 0;
                }
            }
        }
        if cut {
            break; // both sockets close: the server is gone for this client
        }
        if let Some(d) = pause {
            tokio::time::sleep(d).await;
        }
        server_tx.write_all(&chunk[..n]).await?;
    }
    down.abort();
    Ok(())
}
