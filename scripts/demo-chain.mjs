// Chain driver for scripts/demo (Node 18+, no dependencies): deploys the
// committed test contract and emits events over JSON-RPC with explicit nonces.
//   node scripts/demo-chain.mjs deploy RPC                 -> contract address
//   node scripts/demo-chain.mjs emit RPC ADDRESS TXS SEED  -> events emitted
//   node scripts/demo-chain.mjs count RPC ADDRESS TO       -> Burned logs in [0, TO]
//   node scripts/demo-chain.mjs mine RPC N                 -> mines N empty blocks
//   node scripts/demo-chain.mjs head RPC                   -> latest block number
//   node scripts/demo-chain.mjs sender RPC                 -> the account every command sends from (lowercase)
//   node scripts/demo-chain.mjs senders RPC N              -> anvil's first N accounts, one a line (lowercase)
//   node scripts/demo-chain.mjs dense RPC ADDRESS TXS PER_TX [SENDERS] -> TXS transactions of PER_TX events each
//                                                         (sent in turn from anvil's first SENDERS accounts; 1)
//   node scripts/demo-chain.mjs getlogs RPC ADDRESS TO SPAN CONC -> "ms count": raw eth_getLogs of [0, TO]
//   node scripts/demo-chain.mjs proxy PORT UPSTREAM DELAY_MS     -> forwards JSON-RPC, adding a delay
//   node scripts/demo-chain.mjs live RPC ADDRESS BLOCKS INTERVAL_MS -> mines BLOCKS blocks of 3 events, CSV "block,mined_ms"
//   node scripts/demo-chain.mjs deploy-many RPC N          -> N contract addresses, one per line
//   node scripts/demo-chain.mjs scatter RPC FILE BLOCKS TXS SEED INTERVAL_MS
//       -> BLOCKS blocks of TXS transactions each to random contracts of FILE
//          (a Burned, Unlisted or Labeled event each), one block every
//          INTERVAL_MS (0: at once); CSV "block,mined_ms"
//   node scripts/demo-chain.mjs count-all RPC FILE TO [STREAMS] -> logs of FILE's contracts in [0, TO] (of the first STREAMS (contract, event) pairs)
//   node scripts/demo-chain.mjs receiver PORT OUT_CSV      -> a webhook receiver answering 200; appends
//       "block,received_ms" per event to OUT_CSV; GET /count answers the events received
//   node scripts/demo-chain.mjs count-proxy PORT UPSTREAM  -> forwards JSON-RPC and WebSocket;
//       GET /count answers "requests websockets" (a batch counts each request)
import { readFileSync } from 'node:fs';

const contract = JSON.parse(readFileSync(new URL('../tests/contracts/Emitter.json', import.meta.url)));
const BURNED_TOPIC = '0x696de425f79f4a40bc6d2122ca50507f0efbeabbff86a84871b7196ab8ea8df7';
let id = 0;

async function rpc(url, method, params) {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ jsonrpc: '2.0', id: ++id, method, params }) });
  const body = await res.json();
  if (body.error) throw new Error(`${method}: ${JSON.stringify(body.error)}`);
  return body.result;
}

const word = (n) => BigInt(n).toString(16).padStart(64, '0');
const hex = (n) => '0x' + BigInt(n).toString(16);

async function receipt(url, hash) {
  for (let i = 0; i < 600; i++) {
    const r = await rpc(url, 'eth_getTransactionReceipt', [hash]);
    if (r) return r;
    await new Promise((ok) => setTimeout(ok, 50));
  }
  throw new Error(`no receipt for ${hash}`);
}

// A small deterministic generator, so a seed reproduces a run.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
}

// ABI encoding of label(string,bytes,string,uint8,int256).
function labelCall(label, blob, text, small, delta) {
  const dyn = (bytes) => word(bytes.length) + Buffer.from(bytes).toString('hex').padEnd(Math.ceil(bytes.length / 32) * 64, '0');
  const tails = [Buffer.from(label), Buffer.from(blob), Buffer.from(text)].map(dyn);
  let offset = 5 * 32, head = '';
  for (const t of tails) { head += word(offset); offset += t.length / 2; }
  const signed = (BigInt(delta) + (1n << 256n)) % (1n << 256n);
  return '0x' + contract.methods['label(string,bytes,string,uint8,int256)'] + head + word(small) + signed.toString(16).padStart(64, '0') + tails.join('');
}

const [cmd, url, ...args] = process.argv.slice(2);
if (cmd === 'receiver') {
  // url is the port here; args: the CSV to append to.
  const { createServer } = await import('node:http');
  const { appendFileSync } = await import('node:fs');
  const [out] = args;
  let received = 0;
  createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/count') { res.end(`${received}\n`); return; }
    const chunks = [];
    req.on('data', (c) => chunks.push(c)).on('end', () => {
      const at = Date.now();
      res.writeHead(200); res.end();
      try {
        const events = JSON.parse(Buffer.concat(chunks).toString()).events || [];
        received += events.length;
        appendFileSync(out, events.map((e) => `${e.block_number},${at}\n`).join(''));
      } catch { /* not a delivery */ }
    });
  }).listen(Number(url), '127.0.0.1');
  await new Promise(() => {});
}
if (cmd === 'count-proxy') {
  // url is the port here; args: upstream. Counts what reaches the node.
  const { createServer } = await import('node:http');
  const net = await import('node:net');
  const [upstream] = args;
  const up = new URL(upstream);
  let requests = 0, websockets = 0;
  const server = createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/count') { res.end(`${requests} ${websockets}\n`); return; }
    let body = '';
    req.on('data', (c) => (body += c)).on('end', async () => {
      try { const j = JSON.parse(body); requests += Array.isArray(j) ? j.length : 1; } catch { requests += 1; }
      try {
        const r = await fetch(upstream, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
        res.writeHead(r.status, { 'content-type': 'application/json' });
        res.end(await r.text());
      } catch { res.writeHead(502); res.end(); }
    });
  });
  // A WebSocket upgrade goes through as raw bytes, both ways.
  server.on('upgrade', (req, socket, head) => {
    websockets += 1;
    const conn = net.connect(Number(up.port), up.hostname, () => {
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      conn.write(raw + '\r\n');
      if (head && head.length) conn.write(head);
      socket.pipe(conn).pipe(socket);
    });
    const close = () => { socket.destroy(); conn.destroy(); };
    conn.on('error', close); socket.on('error', close);
  });
  server.keepAliveTimeout = 60_000;
  server.listen(Number(url), '127.0.0.1');
  await new Promise(() => {});
}
if (cmd === 'proxy') {
  // url is the port here; args: upstream, delay in ms (simulates a remote provider).
  const { createServer } = await import('node:http');
  const [upstream, delay] = args;
  createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c)).on('end', async () => {
      await new Promise((ok) => setTimeout(ok, Number(delay)));
      const r = await fetch(upstream, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      res.writeHead(r.status, { 'content-type': 'application/json' });
      res.end(await r.text());
    });
  }).listen(Number(url), '127.0.0.1');
  await new Promise(() => {});
}
const [from] = await rpc(url, 'eth_accounts', []);
let nonce = Number(await rpc(url, 'eth_getTransactionCount', [from, 'pending']));
const send = (tx) => rpc(url, 'eth_sendTransaction', [{ from, gas: hex(1_000_000), nonce: hex(nonce++), ...tx }]);

// Mines `blocks` blocks, one every `interval` ms (0: at once), each holding
// what `fill(i)` sends; prints CSV "block,mined_ms".
async function mineEvery(blocks, interval, fill) {
  await rpc(url, 'evm_setAutomine', [false]);
  const rows = ['block,mined_ms'];
  for (let i = 0; i < blocks; i++) {
    const tick = performance.now();
    await fill(i);
    await rpc(url, 'evm_mine', []);
    rows.push(`${Number(await rpc(url, 'eth_blockNumber', []))},${Date.now()}`);
    const wait = interval - (performance.now() - tick);
    if (wait > 0) await new Promise((ok) => setTimeout(ok, wait));
  }
  await rpc(url, 'evm_setAutomine', [true]);
  console.log(rows.join('\n'));
}

if (cmd === 'deploy') {
  const r = await receipt(url, await send({ data: contract.bytecode }));
  console.log(r.contractAddress);
} else if (cmd === 'emit') {
  const [address, txs, seed] = args;
  const next = rng(Number(seed));
  let total = 0, last;
  for (let i = 0; i < Number(txs); i++) {
    // Mostly one or a few events, sometimes a burst of up to 20.
    const n = next() < 0.15 ? 10 + Math.floor(next() * 11) : 1 + Math.floor(next() * 5);
    last = await send({ to: address, data: '0x' + contract.methods['burn(uint256,uint256)'] + word(n) + word(total) });
    total += n;
  }
  if (last) await receipt(url, last);
  console.log(total);
} else if (cmd === 'count') {
  const [address, to] = args;
  const logs = await rpc(url, 'eth_getLogs', [{ fromBlock: '0x0', toBlock: hex(to), address, topics: [BURNED_TOPIC] }]);
  console.log(logs.length);
} else if (cmd === 'mine') {
  await rpc(url, 'anvil_mine', [hex(args[0])]);
} else if (cmd === 'dense') {
  const [address, txs, perTx, senders = 1] = args;
  const accounts = (await rpc(url, 'eth_accounts', [])).slice(0, Number(senders));
  const nonces = {};
  for (const a of accounts) nonces[a] = Number(await rpc(url, 'eth_getTransactionCount', [a, 'pending']));
  let last;
  for (let i = 0; i < Number(txs); i++) {
    // About 1,530 gas per event; a block holds 30M.
    const gas = Math.min(30_000_000, 100_000 + 1_600 * Number(perTx));
    const sender = accounts[i % accounts.length];
    last = await rpc(url, 'eth_sendTransaction', [{ from: sender, gas: hex(gas), nonce: hex(nonces[sender]++), to: address,
      data: '0x' + contract.methods['burn(uint256,uint256)'] + word(perTx) + word(i * Number(perTx)) }]);
  }
  if (last) await receipt(url, last);
  console.log(Number(txs) * Number(perTx));
} else if (cmd === 'getlogs') {
  const [address, to, span, conc] = args.map((a, i) => (i === 0 ? a : Number(a)));
  const started = performance.now();
  const parts = [];
  for (let a = 0; a <= to; a += span) parts.push([a, Math.min(to, a + span - 1)]);
  let count = 0, next = 0;
  const worker = async () => {
    while (next < parts.length) {
      const [a, b] = parts[next++];
      const logs = await rpc(url, 'eth_getLogs', [{ fromBlock: hex(a), toBlock: hex(b), address, topics: [BURNED_TOPIC] }]);
      count += logs.length;
    }
  };
  await Promise.all(Array.from({ length: conc }, worker));
  console.log(`${Math.round(performance.now() - started)} ${count}`);
} else if (cmd === 'live') {
  const [address, blocks, interval] = args.map((a, i) => (i === 0 ? a : Number(a)));
  await mineEvery(blocks, interval, (i) =>
    send({ to: address, data: '0x' + contract.methods['burn(uint256,uint256)'] + word(3) + word(i * 3) }));
} else if (cmd === 'deploy-many') {
  const hashes = [];
  for (let i = 0; i < Number(args[0]); i++) hashes.push(await send({ data: contract.bytecode }));
  const out = [];
  for (const h of hashes) out.push((await receipt(url, h)).contractAddress);
  console.log(out.join('\n'));
} else if (cmd === 'scatter') {
  const [file, blocks, txs, seed, interval] = args.map((a, i) => (i === 0 ? a : Number(a)));
  const addresses = readFileSync(file, 'utf8').split('\n').filter(Boolean);
  const next = rng(seed);
  await mineEvery(blocks, interval, (b) => {
    const sent = [];
    for (let t = 0; t < txs; t++) {
      const to = addresses[Math.floor(next() * addresses.length)];
      const kind = Math.floor(next() * 3);
      const n = 1 + Math.floor(next() * 3);
      const data = kind === 0 ? '0x' + contract.methods['burn(uint256,uint256)'] + word(n) + word(b * 100 + t)
        : kind === 1 ? '0x' + contract.methods['unlisted(uint256)'] + word(b * 100 + t)
        : labelCall(`label-${b}-${t}`, [b % 256, t % 256], `text ${b}/${t}`, t % 256, t % 2 ? -b : b);
      sent.push(send({ to, data }));
    }
    return Promise.all(sent);
  });
} else if (cmd === 'count-all') {
  // STREAMS (optional): only the first STREAMS (contract, event) pairs are
  // watched, in the order Burned, Unlisted, Labeled per contract (told apart
  // by their topic count: 2, 1, 3).
  const [file, to, streams] = args;
  const addresses = readFileSync(file, 'utf8').split('\n').filter(Boolean).map((a) => a.toLowerCase());
  const kindOf = { 2: 0, 1: 1, 3: 2 };
  const watched = (log) => streams === undefined
    || 3 * addresses.indexOf(log.address.toLowerCase()) + kindOf[log.topics.length] < Number(streams);
  let count = 0;
  for (let a = 0; a <= Number(to); a += 1000) {
    const logs = await rpc(url, 'eth_getLogs', [{ fromBlock: hex(a), toBlock: hex(Math.min(Number(to), a + 999)), address: addresses }]);
    count += logs.filter(watched).length;
  }
  console.log(count);
} else if (cmd === 'sender') {
  console.log(from.toLowerCase());
} else if (cmd === 'senders') {
  console.log((await rpc(url, 'eth_accounts', [])).slice(0, Number(args[0])).map((a) => a.toLowerCase()).join('\n'));
} else if (cmd === 'head') {
  console.log(Number(await rpc(url, 'eth_blockNumber', [])));
} else {
  console.error('usage: demo-chain.mjs deploy|emit|count|mine|head RPC …');
  process.exit(64);
}
