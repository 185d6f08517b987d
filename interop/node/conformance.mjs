#!/usr/bin/env node
// Black-box conformance checker for the credproxy wire protocol, version 1.
//
// Written from PROTOCOL.md alone. It spawns the server under test (the
// `memserver` example) several times with different flags, talks to it over
// its Unix socket with raw framed JSON and checks every observable behaviour
// the document states.
//
// Usage:   node interop/node/conformance.mjs /path/to/memserver
// Output:  one line per check ("ok N - ..." / "not ok N - ...: details"),
//          then "conformance: P passed, F failed". Exit status 0 only when
//          every check passed.
//
// Only Node.js built-ins are used (Node 20+).

import net from 'node:net';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} (after ${ms} ms)`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

class CheckError extends Error {}
function expect(cond, msg) {
  if (!cond) throw new CheckError(msg);
}

const show = (s, n = 300) => {
  const t = typeof s === 'string' ? s : JSON.stringify(s);
  return t.length > n ? `${t.slice(0, n)}...(${t.length} chars)` : t;
};
const oneLine = (s) => String(s).replace(/\s*\n\s*/g, ' | ');

/** A frame: 4-byte big-endian length, then the payload bytes. */
function frameBuf(payload) {
  let body;
  if (Buffer.isBuffer(payload)) body = payload;
  else if (typeof payload === 'string') body = Buffer.from(payload, 'utf8');
  else body = Buffer.from(JSON.stringify(payload), 'utf8');
  return Buffer.concat([header(body.length), body]);
}
function header(n) {
  const h = Buffer.alloc(4);
  h.writeUInt32BE(n >>> 0);
  return h;
}

// ---------------------------------------------------------------------------
// A raw JSON parser that keeps number text and duplicate members, so that
// responses can be compared byte-for-byte on numbers ("numbers as written")
// and checked for duplicate names.
//   node = {t:'obj', m:[[k,node],...]} | {t:'arr', a:[...]} | {t:'str', v}
//        | {t:'num', raw} | {t:'bool', v} | {t:'null'}
// ---------------------------------------------------------------------------

function parseRaw(text) {
  let i = 0;
  const fail = (m) => {
    throw new Error(`JSON syntax error at offset ${i}: ${m}`);
  };
  const ws = () => {
    while (i < text.length && ' \t\n\r'.includes(text[i])) i++;
  };
  const strRe = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;
  const numRe = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
  const str = () => {
    strRe.lastIndex = i;
    const m = strRe.exec(text);
    if (!m) fail('bad string');
    i = strRe.lastIndex;
    return JSON.parse(m[0]);
  };
  const value = () => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const m = [];
      ws();
      if (text[i] === '}') {
        i++;
        return { t: 'obj', m };
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected member name');
        const k = str();
        ws();
        if (text[i++] !== ':') fail('expected ":"');
        m.push([k, value()]);
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === '}') {
          i++;
          return { t: 'obj', m };
        }
        fail('expected "," or "}"');
      }
    }
    if (c === '[') {
      i++;
      const a = [];
      ws();
      if (text[i] === ']') {
        i++;
        return { t: 'arr', a };
      }
      for (;;) {
        a.push(value());
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === ']') {
          i++;
          return { t: 'arr', a };
        }
        fail('expected "," or "]"');
      }
    }
    if (c === '"') return { t: 'str', v: str() };
    if (text.startsWith('true', i)) {
      i += 4;
      return { t: 'bool', v: true };
    }
    if (text.startsWith('false', i)) {
      i += 5;
      return { t: 'bool', v: false };
    }
    if (text.startsWith('null', i)) {
      i += 4;
      return { t: 'null' };
    }
    numRe.lastIndex = i;
    const m = numRe.exec(text);
    if (!m) fail('unexpected character');
    i = numRe.lastIndex;
    return { t: 'num', raw: m[0] };
  };
  const v = value();
  ws();
  if (i !== text.length) fail('trailing bytes');
  return v;
}

const member = (node, k) => node && node.t === 'obj' ? node.m.find(([n]) => n === k)?.[1] : undefined;

function findDuplicate(node, p = '$') {
  if (node.t === 'obj') {
    const seen = new Set();
    for (const [k, v] of node.m) {
      if (seen.has(k)) return `${p}.${k}`;
      seen.add(k);
      const d = findDuplicate(v, `${p}.${k}`);
      if (d) return d;
    }
  } else if (node.t === 'arr') {
    for (let j = 0; j < node.a.length; j++) {
      const d = findDuplicate(node.a[j], `${p}[${j}]`);
      if (d) return d;
    }
  }
  return null;
}

/** Difference between an expected and an actual raw tree, or null. Numbers
 *  compare by their text, strings by value, objects ignoring member order. */
function rawDiff(exp, act, p = '$') {
  if (!act) return `${p}: missing`;
  if (exp.t !== act.t) return `${p}: got a ${act.t}, expected a ${exp.t}`;
  switch (exp.t) {
    case 'num':
      return exp.raw === act.raw ? null : `${p}: number text ${act.raw}, expected ${exp.raw}`;
    case 'str':
    case 'bool':
      return exp.v === act.v ? null : `${p}: ${JSON.stringify(act.v)}, expected ${JSON.stringify(exp.v)}`;
    case 'null':
      return null;
    case 'arr':
      if (exp.a.length !== act.a.length) return `${p}: array of ${act.a.length}, expected ${exp.a.length}`;
      for (let j = 0; j < exp.a.length; j++) {
        const d = rawDiff(exp.a[j], act.a[j], `${p}[${j}]`);
        if (d) return d;
      }
      return null;
    case 'obj': {
      const ek = exp.m.map(([k]) => k).sort();
      const ak = act.m.map(([k]) => k).sort();
      const extra = ak.filter((k) => !ek.includes(k));
      const missing = ek.filter((k) => !ak.includes(k));
      if (extra.length) return `${p}: unexpected member(s) ${extra.join(', ')}`;
      if (missing.length) return `${p}: missing member(s) ${missing.join(', ')}`;
      if (ak.length !== new Set(ak).size) return `${p}: duplicate member`;
      for (const [k, v] of exp.m) {
        const d = rawDiff(v, member(act, k), `${p}.${k}`);
        if (d) return d;
      }
      return null;
    }
  }
  return `${p}: unknown node`;
}

/** Removes member k from a raw object tree (returns a copy). */
const withoutMember = (node, k) => ({ t: 'obj', m: node.m.filter(([n]) => n !== k) });

// ---------------------------------------------------------------------------
// Global observations, checked at the end of the run
// ---------------------------------------------------------------------------

const CODES = [
  'NOT_FOUND', 'INVALID_REQUEST', 'UNAUTHORIZED', 'RATE_LIMITED', 'INTERNAL_ERROR',
  'UNKNOWN_VERSION', 'RESOURCE_EXHAUSTED', 'REFRESH_NOT_AVAILABLE', 'REAUTH_REQUIRED', 'PROVIDER_NOT_FOUND',
];
// Values of "denied" on an UNAUTHORIZED failure ("Responses").
const DENIAL_KINDS = ['provider', 'bucket', 'api_key', 'read_only', 'new_token_limit'];
const SECRETS = new Set(); // refresh tokens: must never appear in any byte the server sends
const OTHER_SECRETS = new Set(); // access tokens and API key values: must never appear in an error message
const allConns = [];
const violations = { frame: [], format: [], unsolicited: [], errorSecret: [] };
let frameCount = 0;

// ---------------------------------------------------------------------------
// Framed-JSON client
// ---------------------------------------------------------------------------

let idSeq = 0;
const newId = (p = 'q') => `${p}${++idSeq}`;

class Frame {
  constructor(bytes, index) {
    this.bytes = bytes;
    this.index = index; // 0 = first frame the server sent on this connection
    this.problem = null;
    try {
      this.text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      this.text = null;
      this.problem = 'frame is not valid UTF-8';
      return;
    }
    try {
      this.tree = parseRaw(this.text);
      this.json = JSON.parse(this.text);
    } catch (e) {
      this.problem = `frame is not valid JSON (${e.message})`;
    }
  }
  get id() {
    return this.json?.id;
  }
  toString() {
    return show(this.text ?? this.bytes.toString('latin1'));
  }
}

class Conn {
  constructor(sock, label) {
    this.sock = sock;
    this.label = label;
    this.buf = Buffer.alloc(0);
    this.chunks = []; // every byte received, for the refresh-token scan
    this.queue = []; // frames received and not yet taken by a check
    this.nframes = 0;
    this.waiters = new Set();
    this.closed = false;
    this.sentIds = new Set();
    this.answered = new Set();
    this.headerBroken = false;
    this.outBuf = Buffer.alloc(0); // bytes sent, to learn the ids of complete frames
    allConns.push(this);
    sock.on('data', (d) => {
      this.chunks.push(d);
      this.buf = Buffer.concat([this.buf, d]);
      this.parse();
    });
    sock.on('error', () => {}); // a close follows
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }

  static open(socketPath, label = 'conn') {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path: socketPath });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error(`connect to ${socketPath} timed out`));
      }, 3000);
      sock.once('connect', () => {
        clearTimeout(timer);
        resolve(new Conn(sock, label));
      });
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`connect to ${socketPath}: ${e.message}`));
      });
    });
  }

  parse() {
    while (!this.headerBroken && this.buf.length >= 4) {
      const len = this.buf.readUInt32BE(0);
      if (len === 0 || len > 65536) {
        violations.frame.push(`${this.label}: server sent a frame header with length ${len}`);
        this.headerBroken = true;
        return;
      }
      if (this.buf.length < 4 + len) break;
      const f = new Frame(Buffer.from(this.buf.subarray(4, 4 + len)), this.nframes++);
      this.buf = this.buf.subarray(4 + len);
      frameCount++;
      this.observe(f);
      this.queue.push(f);
    }
    this.wake();
  }

  /** Invariants every frame from the server must satisfy (PROTOCOL.md
   *  "Frames", "Responses"). */
  observe(f) {
    const bad = (m) => violations.format.push(`${this.label}: ${m}: ${f}`);
    if (f.problem) return bad(f.problem);
    if (f.tree.t !== 'obj') return bad('frame is not a JSON object');
    const dup = findDuplicate(f.tree);
    if (dup) bad(`duplicate member ${dup}`);
    const j = f.json;
    if (f.index === 0 && j.op === 'handshake') {
      if (j.v !== 1) bad('handshake reply without "v":1');
      return;
    }
    if (typeof j.id !== 'string') bad('response id is not a string');
    if (typeof j.ok !== 'boolean') bad('response "ok" is not a boolean');
    if (j.ok === true) {
      if (!j.data || typeof j.data !== 'object' || Array.isArray(j.data)) bad('success "data" is not an object');
      if ('code' in j || 'error' in j || 'denied' in j) bad('success response carries code/error/denied');
    }
    if (j.ok === false) {
      if (!CODES.includes(j.code)) bad(`unknown code ${JSON.stringify(j.code)}`);
      if (typeof j.error !== 'string' || j.error === '') bad('failure without an error text');
      if (j.code === 'RATE_LIMITED') {
        const ra = member(f.tree, 'retryAfter');
        if (!ra || ra.t !== 'num' || !/^[1-9][0-9]*$/.test(ra.raw)) bad('RATE_LIMITED without an integer retryAfter >= 1');
      }
      if ('denied' in j) {
        if (j.code !== 'UNAUTHORIZED') bad('"denied" on a failure other than UNAUTHORIZED');
        if (!DENIAL_KINDS.includes(j.denied)) bad(`"denied" is ${JSON.stringify(j.denied)}, not one of ${DENIAL_KINDS.join(', ')}`);
      }
      if (typeof j.error === 'string') {
        for (const s of [...SECRETS, ...OTHER_SECRETS]) {
          if (j.error.includes(s)) violations.errorSecret.push(`${this.label}: error text contains secret ${s}: ${f}`);
        }
      }
    }
    // The first frame may be the failure answering a non-handshake first
    // frame; the document does not say whether that one carries "v".
    if (f.index > 0 && 'v' in j) bad('response carries "v"');
    if (typeof j.id === 'string' && j.id !== 'unknown') {
      if (!this.sentIds.has(j.id)) {
        violations.unsolicited.push(`${this.label}: response for id ${JSON.stringify(j.id)} that was never sent: ${f}`);
      } else if (this.answered.has(j.id)) {
        violations.unsolicited.push(`${this.label}: second response for id ${JSON.stringify(j.id)}: ${f}`);
      }
      this.answered.add(j.id);
    }
  }

  wake() {
    for (const w of [...this.waiters]) w();
  }

  /** Sends raw bytes. Ids of JSON frames in them are remembered. */
  write(buf) {
    this.noteIds(buf);
    return new Promise((resolve) => {
      if (this.sock.destroyed) return resolve();
      this.sock.write(buf, () => resolve());
    });
  }

  noteIds(buf) {
    this.outBuf = Buffer.concat([this.outBuf, buf]);
    while (this.outBuf.length >= 4) {
      const len = this.outBuf.readUInt32BE(0);
      if (len === 0 || len > 65536) {
        this.outBuf = Buffer.alloc(0); // the server closes the connection
        return;
      }
      if (this.outBuf.length < 4 + len) return;
      try {
        const tree = parseRaw(this.outBuf.subarray(4, 4 + len).toString('utf8'));
        const id = member(tree, 'id');
        if (id?.t === 'str') this.sentIds.add(id.v);
        if (id?.t === 'num') this.sentIds.add(id.raw);
      } catch {
        /* not JSON: nothing to remember */
      }
      this.outBuf = this.outBuf.subarray(4 + len);
    }
  }

  /** Sends one frame (object, JSON text, or Buffer payload). */
  send(payload) {
    return this.write(frameBuf(payload));
  }

  /** Waits for (and removes) the first queued frame matching pred. */
  take(pred, timeout = 3000, what = 'a frame') {
    return new Promise((resolve, reject) => {
      let timer = null;
      const cleanup = () => {
        if (timer) clearTimeout(timer);
        this.waiters.delete(attempt);
      };
      const attempt = () => {
        const k = this.queue.findIndex(pred);
        if (k >= 0) {
          cleanup();
          resolve(this.queue.splice(k, 1)[0]);
        } else if (this.closed) {
          cleanup();
          reject(new CheckError(`connection closed by the server while waiting for ${what}`));
        }
      };
      this.waiters.add(attempt);
      timer = setTimeout(() => {
        cleanup();
        reject(new CheckError(`no ${what} within ${timeout} ms`));
      }, timeout);
      attempt();
    });
  }

  next(timeout = 3000) {
    return this.take(() => true, timeout, 'frame');
  }

  waitId(id, timeout = 3000) {
    return this.take((f) => f.id === id, timeout, `response with id ${JSON.stringify(id)}`);
  }

  /** Resolves when the server has closed the connection; fails otherwise. */
  waitClosed(timeout = 3000) {
    return new Promise((resolve, reject) => {
      if (this.closed) return resolve();
      const timer = setTimeout(() => {
        this.waiters.delete(w);
        reject(new CheckError(`server did not close the connection within ${timeout} ms`));
      }, timeout);
      const w = () => {
        if (this.closed) {
          clearTimeout(timer);
          this.waiters.delete(w);
          resolve();
        }
      };
      this.waiters.add(w);
    });
  }

  /** Expects the connection to be closed with no further frame. */
  async expectClosedQuietly(timeout = 3000) {
    await this.waitClosed(timeout);
    expect(this.queue.length === 0, `unexpected frame before close: ${this.queue[0]}`);
  }

  /** Expects the connection to stay open and silent for ms. */
  async expectSilent(ms = 150) {
    await sleep(ms);
    expect(this.queue.length === 0, `unexpected frame: ${this.queue[0]}`);
    expect(!this.closed, 'server closed the connection');
  }

  async handshake(msg = HANDSHAKE) {
    await this.send(msg);
    const f = await this.next();
    expect(f.json && f.json.ok === true, `handshake refused: ${f}`);
    return f;
  }

  /** Request/response by id. extra members go into the envelope. */
  async call(op, payload, extra = {}) {
    const id = extra.id ?? newId();
    const msg = { v: 1, id, op };
    if (payload !== undefined) msg.payload = payload;
    Object.assign(msg, extra);
    await this.send(msg);
    return this.waitId(typeof id === 'number' ? String(id) : id);
  }

  /** Sends a JSON text with the given id and waits for that id. */
  async callText(text, id) {
    await this.send(text);
    return this.waitId(id);
  }

  close() {
    this.sock.destroy();
  }
}

const HANDSHAKE = { v: 1, op: 'handshake', payload: { minVersion: 1, maxVersion: 1 } };
const HANDSHAKE_OK = { v: 1, op: 'handshake', ok: true, data: { version: 1 } };
const HANDSHAKE_BAD = {
  v: 1, op: 'handshake', ok: false, code: 'UNKNOWN_VERSION', error: 'unsupported protocol version',
};
// A session's server ("Handshake", "Sessions") requires the session's
// capability token in the handshake's payload.
const tokenHandshake = (token, payload = HANDSHAKE.payload, v = 1) => ({ v, op: 'handshake', payload: { ...payload, capabilityToken: token } });
const HANDSHAKE_UNAUTH = {
  v: 1, op: 'handshake', ok: false, code: 'UNAUTHORIZED', error: 'invalid or missing capability token',
};

// Assertions on responses --------------------------------------------------

function isOk(f, id) {
  expect(f.json, `unparseable response: ${f}`);
  if (id !== undefined) expect(f.json.id === id, `id ${JSON.stringify(f.json.id)}, expected ${JSON.stringify(id)}: ${f}`);
  expect(f.json.ok === true, `expected success, got ${f}`);
  return f.json.data;
}

/** Checks a failure: code, and optionally id, exact error text and that the
 *  error text contains none of the given values. */
function isFail(f, code, { id, error, hides = [] } = {}) {
  expect(f.json, `unparseable response: ${f}`);
  expect(f.json.ok === false && f.json.code === code, `expected ${code}, got ${f}`);
  if (id !== undefined) expect(f.json.id === id, `id ${JSON.stringify(f.json.id)}, expected ${JSON.stringify(id)}: ${f}`);
  if (error !== undefined) expect(f.json.error === error, `error text ${JSON.stringify(f.json.error)}, expected ${JSON.stringify(error)}`);
  for (const v of hides) {
    if (v.length >= 3) expect(!f.json.error.includes(v), `error text ${JSON.stringify(f.json.error)} contains the payload value ${JSON.stringify(v)}`);
  }
  return f.json;
}

function sameJSON(actual, expected, what) {
  const a = JSON.stringify(sortKeys(actual));
  const e = JSON.stringify(sortKeys(expected));
  expect(a === e, `${what}: got ${show(actual)}, expected ${show(expected)}`);
}
function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === 'object') return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])]));
  return v;
}

/** After a failure the connection must still be open and in sync. */
async function inSync(c) {
  const f = await c.call('list_providers');
  isOk(f);
  expect(Array.isArray(f.json.data.providers), `list_providers after a failure: ${f}`);
}

// ---------------------------------------------------------------------------
// Server processes
// ---------------------------------------------------------------------------

const servers = [];

/** Spawns memserver with a tokens file made of fixture; does not wait. */
function spawnServer(label, { fixture, args = [], socketDir = true, spawnOpts = {}, dir } = {}) {
  dir ??= fs.mkdtempSync(path.join(os.tmpdir(), 'credproxy-conformance-'));
  const tokensFile = path.join(dir, 'tokens.json');
  fs.writeFileSync(tokensFile, fixture, { mode: 0o644 });
  const argv = ['-tokens', tokensFile];
  let sockDir = null;
  if (socketDir) {
    sockDir = typeof socketDir === 'string' ? socketDir : path.join(dir, 'sock');
    if (!fs.existsSync(sockDir)) fs.mkdirSync(sockDir, { mode: 0o700 });
    argv.push('-socket-dir', sockDir);
  }
  argv.push(...args);
  const { bin = BIN, ...rest } = spawnOpts;
  const child = spawn(bin, argv, { stdio: ['ignore', 'pipe', 'pipe'], ...rest });
  const srv = { label, child, dir, sockDir, stdout: '', stderr: '', exit: null, argv, token: null };
  servers.push(srv);
  srv.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      srv.exit = { code, signal };
      resolve(srv.exit);
    });
    child.on('error', (e) => {
      srv.exit = { code: null, signal: null, error: e };
      resolve(srv.exit);
    });
  });
  // 'close' comes after 'exit' once stdout and stderr have been read to the end.
  srv.closed = new Promise((resolve) => child.on('close', resolve));
  child.stdout.on('data', (d) => (srv.stdout += d));
  child.stderr.on('data', (d) => (srv.stderr += d));
  return srv;
}

/** Starts memserver and waits for its LLXPRT_CREDENTIAL_SOCKET line; with
 *  -session (or withToken), also for its second line,
 *  LLXPRT_CAPABILITY_TOKEN=<token>, kept as srv.token. */
async function startServer(label, opts = {}) {
  const withToken = opts.withToken ?? (opts.args ?? []).includes('-session');
  const srv = spawnServer(label, opts);
  const deadline = Date.now() + 8000;
  for (;;) {
    const m = /^LLXPRT_CREDENTIAL_SOCKET=(.*)\n/m.exec(srv.stdout);
    const t = /^LLXPRT_CAPABILITY_TOKEN=(.*)\n/m.exec(srv.stdout);
    if (m && (!withToken || t)) {
      srv.socketPath = m[1];
      if (t) srv.token = t[1];
      return srv;
    }
    const want = withToken ? 'LLXPRT_CREDENTIAL_SOCKET and LLXPRT_CAPABILITY_TOKEN lines' : 'LLXPRT_CREDENTIAL_SOCKET line';
    if (srv.exit) throw new Error(`${label}: server exited (${JSON.stringify(srv.exit)}) before printing its ${want}; stderr: ${show(srv.stderr, 500)}`);
    if (Date.now() > deadline) throw new Error(`${label}: no ${want} within 8 s; stdout: ${show(srv.stdout, 200)}; stderr: ${show(srv.stderr, 500)}`);
    await sleep(20);
  }
}

async function stopServer(srv, signal = 'SIGTERM', timeout = 6000) {
  if (!srv.exit) {
    try {
      process.kill(srv.child.pid, signal);
    } catch {
      /* already gone */
    }
  }
  return withTimeout(srv.exited, timeout, `${srv.label} did not exit after ${signal}`);
}

// ---------------------------------------------------------------------------
// Check runner (TAP-like output)
// ---------------------------------------------------------------------------

let num = 0;
let passed = 0;
let failed = 0;
let skipped = 0;
const notes = []; // observations printed as TAP comments at the end

async function check(section, desc, fn, timeout = 8000) {
  num++;
  const name = `${desc} [${section}]`;
  try {
    await withTimeout(Promise.resolve().then(fn), timeout, 'check timed out');
    passed++;
    console.log(`ok ${num} - ${name}`);
  } catch (e) {
    failed++;
    console.log(`not ok ${num} - ${name}: ${oneLine(e instanceof CheckError ? e.message : e.stack || e)}`);
  }
}

function skip(section, desc, reason) {
  num++;
  skipped++;
  console.log(`ok ${num} - ${desc} [${section}] # SKIP ${reason}`);
}

/** Runs fn on a fresh connection (handshaken unless told otherwise). */
async function session(srv, fn, { handshake = true, label = 'session' } = {}) {
  const c = await Conn.open(srv.socketPath, `${srv.label}/${label}`);
  try {
    if (handshake) await c.handshake(srv.token ? tokenHandshake(srv.token) : HANDSHAKE);
    return await fn(c);
  } finally {
    c.close();
  }
}

// ---------------------------------------------------------------------------
// Fixtures. Token texts are written by hand so that the exact text of every
// number is known (PROTOCOL.md "Numbers inside tokens are kept as written").
// ---------------------------------------------------------------------------

const RT = (s) => {
  const v = `rt-SECRET-${s}-7c1e5a`;
  SECRETS.add(v);
  return v;
};

const T = {
  anthropicDefault: String.raw`{"access_token":"at-anthropic-default-A1","refresh_token":"${RT('anthropic-default')}","token_type":"Bearer","scope":"user:inference user:profile","expiry":1893456000,"account_id":"acct-0042","id_token":"eyJhbGciOi.eyJzdWIi.c2ln","resource_url":"portal.example.com","big":12345678901234567890,"price":1.50,"sci":1.0E+2,"negzero":-0.0,"tiny":-3e-7,"nested":{"list":[1,2.50,12345678901234567890123,{"deep":0.10}],"html":"<a&b>","uni":"\u00e9\u20ac\ud83d\ude00 é€😀","esc":"line\nbreak \"quoted\" \\ \/"},"flag":true,"off":false,"empty":{},"none":[]}`,
  anthropicWork: `{"access_token":"at-anthropic-work-A2","refresh_token":"${RT('anthropic-work')}","expiry":1893456001}`,
  anthropicAlpha: `{"access_token":"at-anthropic-alpha-A3","refresh_token":"${RT('anthropic-alpha')}"}`,
  anthropicBeta: `{"access_token":"at-anthropic-beta-A4"}`,
  openai: `{"access_token":"at-openai-O1","refresh_token":"${RT('openai')}","account_id":"acct-openai-7","expiry":1700000000,"token_type":"bearer"}`,
  qwen: `{"access_token":"at-qwen-Q1","resource_url":"portal.qwen.ai"}`,
  blob: `{"access_token":"at-blob-B1","refresh_token":"${RT('blob')}","pad":"${'x'.repeat(70000)}"}`,
  merge: `{"access_token":"at-merge-old","refresh_token":"${RT('merge-old')}","account_id":"acct-merge","expiry":1893456000,"scope":"s1","keepnum":98765432109876543210}`,
  removeDefault: `{"access_token":"at-remove-default","refresh_token":"${RT('remove-default')}"}`,
  removeKeep: `{"access_token":"at-remove-keep","refresh_token":"${RT('remove-keep')}"}`,
  dup: `{"access_token":"at-dup-orig","refresh_token":"${RT('dup')}","n":1}`,
  minimal: `{"access_token":"at-minimal-M1","refresh_token":"${RT('minimal')}"}`,
};
const KEYS = {
  anthropic: 'sk-ant-KEYVALUE-1111',
  'gemini.key@1': 'gm-KEYVALUE-2222',
  openai_api_key: 'sk-openai-KEYVALUE-3333',
  'xai-key': 'xai-KEYVALUE-4444',
};
for (const t of Object.values(T)) OTHER_SECRETS.add(JSON.parse(t).access_token);
for (const v of Object.values(KEYS)) OTHER_SECRETS.add(v);

const MAIN_FIXTURE = `{"tokens":{
 "anthropic":{"default":${T.anthropicDefault},"work":${T.anthropicWork},"alpha":${T.anthropicAlpha},"beta":${T.anthropicBeta}},
 "openai":{"default":${T.openai}},
 "qwen":{"default":${T.qwen}},
 "blob":{"default":${T.blob}},
 "mergeprov":{"default":${T.merge}},
 "removeprov":{"default":${T.removeDefault},"keep":${T.removeKeep}},
 "dupprov":{"default":${T.dup}},
 "minimal":{"default":${T.minimal}}
},"keys":${JSON.stringify(KEYS)}}`;
const MAIN_PROVIDERS = ['anthropic', 'blob', 'dupprov', 'mergeprov', 'minimal', 'openai', 'qwen', 'removeprov'];

const tok = (s) => `{"access_token":"at-${s}","refresh_token":"${RT(s)}"}`;
for (const s of ['pol-a-default', 'pol-a-work', 'pol-a-personal', 'pol-a-openai', 'pol-o-default', 'pol-g-default', 'pol-ok-default', 'pol-w-default']) {
  OTHER_SECRETS.add(`at-${s}`);
}
// Policy server: -allow-provider anthropic -allow-provider openai
//                -allow-bucket default -allow-bucket work -allow-key openai_key
const POLICY_FIXTURE = `{"tokens":{
 "anthropic":{"default":${tok('pol-a-default')},"work":${tok('pol-a-work')},"personal":${tok('pol-a-personal')},"openai":${tok('pol-a-openai')}},
 "openai":{"default":${tok('pol-o-default')}},
 "gemini":{"default":${tok('pol-g-default')}},
 "openai_key":{"default":${tok('pol-ok-default')}},
 "work":{"default":${tok('pol-w-default')}}
},"keys":{"openai_key":"sk-pol-KEYVALUE-1","anthropic":"sk-pol-KEYVALUE-2","default":"sk-pol-KEYVALUE-3","gemini_key":"sk-pol-KEYVALUE-4"}}`;
for (const v of ['sk-pol-KEYVALUE-1', 'sk-pol-KEYVALUE-2', 'sk-pol-KEYVALUE-3', 'sk-pol-KEYVALUE-4']) OTHER_SECRETS.add(v);
const POLICY_ARGS = ['-allow-provider', 'anthropic', '-allow-provider', 'openai', '-allow-bucket', 'default', '-allow-bucket', 'work', '-allow-key', 'openai_key'];

const SMALL_FIXTURE = `{"tokens":{"anthropic":{"default":${tok('small-default')}}},"keys":{"k":"small-KEYVALUE"}}`;

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

const BIN = process.argv[2];
if (!BIN) {
  console.error('usage: node conformance.mjs /path/to/memserver');
  process.exit(2);
}

async function main() {
  try {
    fs.accessSync(BIN, fs.constants.X_OK);
  } catch {
    console.log(`not ok 1 - server binary ${BIN} is not executable`);
    console.log('conformance: 0 passed, 1 failed');
    process.exit(1);
  }

  let main, fast, policy;
  try {
    main = await startServer('main', { fixture: MAIN_FIXTURE });
    fast = await startServer('rate0', { fixture: MAIN_FIXTURE, args: ['-rate', '0'] });
    policy = await startServer('policy', { fixture: POLICY_FIXTURE, args: POLICY_ARGS });
  } catch (e) {
    console.log(`not ok 1 - start the server under test: ${oneLine(e.message)}`);
    console.log('conformance: 0 passed, 1 failed');
    await cleanup();
    process.exit(1);
  }

  await initialListCheck(main);
  await transportChecks(main);
  await frameChecks(main, fast);
  await jsonChecks(main);
  await handshakeChecks(main);
  await requestChecks(main);
  await operationChecks(main);
  await policyChecks(policy);
  await sessionChecks(main);
  await rateLimitChecks(main, fast);
  await pipeliningChecks(fast);
  await connectionChecks();
  await shutdownChecks(main, fast, policy);
  await globalChecks();

  await cleanup();
  for (const n of notes) console.log(`# note: ${n}`);
  if (skipped) console.log(`# ${skipped} check(s) skipped`);
  console.log(`conformance: ${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

async function cleanup() {
  for (const c of allConns) c.close();
  for (const s of servers) {
    if (!s.exit) {
      try {
        await stopServer(s, 'SIGTERM', 3000);
      } catch {
        try {
          process.kill(s.child.pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
    try {
      fs.rmSync(s.dir, { recursive: true, force: true });
    } catch {
      /* ignore */
    }
  }
}

// ---------------------------------------------------------------------------
// "Roles and transport"
// ---------------------------------------------------------------------------

async function transportChecks(main) {
  const S = 'Roles and transport';
  let def = null;
  let startErr = null;
  try {
    def = await startServer('default-dir', { fixture: SMALL_FIXTURE, socketDir: false });
  } catch (e) {
    startErr = e;
  }

  await check(S, 'server started without -socket-dir prints one LLXPRT_CREDENTIAL_SOCKET line', async () => {
    if (startErr) throw startErr;
    expect(def.stdout === `LLXPRT_CREDENTIAL_SOCKET=${def.socketPath}\n`, `stdout is ${JSON.stringify(def.stdout)}`);
  });

  await check(S, 'default socket path is {realpath(tmp)}/llxprt-cred-{uid}/llxprt-cred-{pid}-{8 hex}.sock', async () => {
    if (startErr) throw startErr;
    const tmp = fs.realpathSync(process.env.TMPDIR || '/tmp');
    const uid = process.getuid();
    const re = new RegExp(`^${escapeRe(tmp)}/llxprt-cred-${uid}/llxprt-cred-${def.child.pid}-[0-9a-f]{8}\\.sock$`);
    expect(re.test(def.socketPath), `path ${def.socketPath} does not match ${re}`);
  });

  await check(S, 'default socket directory has mode 0700 and belongs to the user', async () => {
    if (startErr) throw startErr;
    const st = fs.statSync(path.dirname(def.socketPath));
    expect(st.isDirectory(), 'not a directory');
    expect((st.mode & 0o777) === 0o700, `mode ${(st.mode & 0o777).toString(8)}`);
    expect(st.uid === process.getuid(), `owner uid ${st.uid}`);
  });

  await check(S, 'default socket file is a socket with mode 0600', async () => {
    if (startErr) throw startErr;
    const st = fs.lstatSync(def.socketPath);
    expect(st.isSocket(), 'not a socket');
    expect((st.mode & 0o777) === 0o600, `mode ${(st.mode & 0o777).toString(8)}`);
  });

  await check(S, 'a client of the same uid connects at the default path and handshakes', async () => {
    if (startErr) throw startErr;
    await session(def, async (c) => inSync(c));
  });

  await check(S, 'SIGTERM: open connections are closed, socket file removed, exit status 0', async () => {
    if (startErr) throw startErr;
    const c = await Conn.open(def.socketPath, 'default-dir/sigterm');
    await c.handshake();
    const ex = await stopServer(def, 'SIGTERM');
    await c.expectClosedQuietly(3000);
    expect(ex.code === 0 && ex.signal === null, `exit ${JSON.stringify(ex)}; stderr: ${show(def.stderr, 300)}`);
    expect(!fs.existsSync(def.socketPath), `socket ${def.socketPath} still exists`);
    expect(def.stdout === `LLXPRT_CREDENTIAL_SOCKET=${def.socketPath}\n`, `stdout is ${JSON.stringify(def.stdout)}`);
  });

  await check('memserver -socket-dir', 'socket is created in the -socket-dir directory with mode 0600', async () => {
    expect(path.dirname(main.socketPath) === main.sockDir || path.dirname(main.socketPath) === fs.realpathSync(main.sockDir),
      `socket ${main.socketPath} not in ${main.sockDir}`);
    const st = fs.lstatSync(main.socketPath);
    expect(st.isSocket(), 'not a socket');
    expect((st.mode & 0o777) === 0o600, `mode ${(st.mode & 0o777).toString(8)}`);
    expect(main.stdout === `LLXPRT_CREDENTIAL_SOCKET=${main.socketPath}\n`, `stdout is ${JSON.stringify(main.stdout)}`);
  });

  // Peer credentials: needs two uids. As root we run the server as "nobody"
  // and connect as root (root may open the 0600 socket; its uid differs).
  if (process.getuid() !== 0) {
    skip(S, 'connection from another uid is closed without a byte', 'needs root to use a second uid');
  } else {
    await check(S, 'connection from another uid is closed without reading or writing anything', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'credproxy-conformance-uid-'));
      fs.chmodSync(dir, 0o755);
      const bin = path.join(dir, 'memserver');
      fs.copyFileSync(BIN, bin);
      fs.chmodSync(bin, 0o755);
      const sockDir = path.join(dir, 'sock');
      fs.mkdirSync(sockDir, { mode: 0o700 });
      fs.chownSync(sockDir, 65534, 65534);
      const other = await startServer('other-uid', {
        fixture: SMALL_FIXTURE, dir, socketDir: true, spawnOpts: { bin, uid: 65534, gid: 65534 },
      });
      const c = await Conn.open(other.socketPath, 'other-uid/root-client');
      await c.send(HANDSHAKE);
      await c.waitClosed(3000);
      const got = Buffer.concat(c.chunks);
      expect(got.length === 0, `server wrote ${got.length} bytes: ${show(got.toString('latin1'))}`);
      await stopServer(other);
    });
  }
}

const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

// ---------------------------------------------------------------------------
// "Frames"
// ---------------------------------------------------------------------------

async function frameChecks(main, fast) {
  const S = 'Frames';

  await check(S, 'handshake frame written one byte per write is accepted', async () => {
    await session(main, async (c) => {
      const buf = frameBuf(HANDSHAKE);
      for (const b of buf) {
        await c.write(Buffer.from([b]));
        await sleep(2);
      }
      const f = await c.next();
      sameJSON(f.json, HANDSHAKE_OK, 'handshake reply');
      await inSync(c);
    }, { handshake: false });
  });

  await check(S, 'handshake frame split in two writes at every byte boundary (incl. inside the header)', async () => {
    const buf = frameBuf(HANDSHAKE);
    for (let k = 1; k < buf.length; k++) {
      await session(fast, async (c) => {
        await c.write(buf.subarray(0, k));
        await sleep(3);
        await c.write(buf.subarray(k));
        const f = await c.next();
        expect(f.json?.ok === true, `split at ${k}: ${f}`);
      }, { handshake: false, label: `split${k}` });
    }
  }, 20000);

  await check(S, 'request frame written one byte per write is answered', async () => {
    await session(main, async (c) => {
      const buf = frameBuf({ id: 'bytewise', op: 'get_api_key', payload: { name: 'xai-key' } });
      for (const b of buf) {
        await c.write(Buffer.from([b]));
        await sleep(2);
      }
      const f = await c.waitId('bytewise');
      sameJSON(isOk(f), { key: KEYS['xai-key'] }, 'data');
    });
  });

  await check(S, 'request frame split in two writes at every byte boundary is answered each time', async () => {
    await session(fast, async (c) => {
      const tmpl = (id) => frameBuf({ id, op: 'get_token', payload: { provider: 'qwen' } });
      const len = tmpl('s00').length;
      for (let k = 1; k < len; k++) {
        const id = `s${String(k).padStart(2, '0')}`;
        const buf = tmpl(id);
        await c.write(buf.subarray(0, k));
        await sleep(3);
        await c.write(buf.subarray(k));
        const f = await c.waitId(id);
        expect(isOk(f).access_token === 'at-qwen-Q1', `split at ${k}: ${f}`);
      }
    });
  }, 15000);

  await check(S, 'handshake and three requests in one write are all answered', async () => {
    await session(main, async (c) => {
      const buf = Buffer.concat([
        frameBuf(HANDSHAKE),
        frameBuf({ id: 'm1', op: 'has_api_key', payload: { name: 'anthropic' } }),
        frameBuf({ id: 'm2', op: 'has_api_key', payload: { name: 'nokey' } }),
        frameBuf({ id: 'm3', op: 'list_api_keys' }),
      ]);
      await c.write(buf);
      const h = await c.next();
      sameJSON(h.json, HANDSHAKE_OK, 'handshake reply');
      sameJSON(isOk(await c.waitId('m1')), { exists: true }, 'm1');
      sameJSON(isOk(await c.waitId('m2')), { exists: false }, 'm2');
      expect(Array.isArray(isOk(await c.waitId('m3')).keys), 'm3');
    }, { handshake: false });
  });

  await check(S, 'five frames written in 3-byte chunks (frames straddling writes) are all answered', async () => {
    await session(main, async (c) => {
      const ids = ['c1', 'c2', 'c3', 'c4', 'c5'];
      const buf = Buffer.concat(ids.map((id) => frameBuf({ id, op: 'get_api_key', payload: { name: 'anthropic' } })));
      for (let k = 0; k < buf.length; k += 3) {
        await c.write(buf.subarray(k, k + 3));
        await sleep(1);
      }
      for (const id of ids) sameJSON(isOk(await c.waitId(id)), { key: KEYS.anthropic }, id);
    });
  });

  const badHeader = async (c, n, error) => {
    await c.write(header(n));
    const f = await c.next();
    sameJSON(f.json, { id: 'unknown', ok: false, code: 'INVALID_REQUEST', error }, `reply to length ${n}`);
    await c.expectClosedQuietly(3000);
  };

  await check(S, 'length-0 header after the handshake: one INVALID_REQUEST "empty frame" with id "unknown", then close', async () => {
    await session(main, (c) => badHeader(c, 0, 'empty frame'));
  });
  await check(S, 'length-65537 header after the handshake: one INVALID_REQUEST "frame too large" with id "unknown", then close', async () => {
    await session(main, (c) => badHeader(c, 65537, 'frame too large'));
  });
  await check(S, 'length-0xFFFFFFFF header: one INVALID_REQUEST "frame too large", then close', async () => {
    await session(main, (c) => badHeader(c, 0xffffffff, 'frame too large'));
  });
  await check(S, 'length-0 header as the very first frame: "empty frame", then close', async () => {
    await session(main, (c) => badHeader(c, 0, 'empty frame'), { handshake: false });
  });
  await check(S, 'length-65537 header as the very first frame: "frame too large", then close', async () => {
    await session(main, (c) => badHeader(c, 65537, 'frame too large'), { handshake: false });
  });

  await check(S, 'a frame of exactly 65536 bytes is accepted', async () => {
    await session(main, async (c) => {
      const head = '{"id":"max65536","op":"list_api_keys","pad":"';
      const text = head + 'p'.repeat(65536 - head.length - 2) + '"}';
      expect(Buffer.byteLength(text) === 65536, 'test bug: frame size');
      const f = await c.callText(text, 'max65536');
      expect(Array.isArray(isOk(f).keys), `${f}`);
    });
  });

  await check(S, 'a response that would exceed 65536 bytes is INTERNAL_ERROR "response too large"; connection stays usable', async () => {
    await session(main, async (c) => {
      const f = await c.call('get_token', { provider: 'blob' });
      isFail(f, 'INTERNAL_ERROR', { id: f.json?.id, error: 'response too large' });
      await inSync(c);
    });
  });
}

// ---------------------------------------------------------------------------
// "JSON rules"
// ---------------------------------------------------------------------------

async function jsonChecks(main) {
  const S = 'JSON rules';

  /** Sends one frame expected to be rejected as a whole, reads the next
   *  frame (whatever its id) and checks it, then checks the connection. */
  const rejected = async (c, payload, code = 'INVALID_REQUEST', opts = {}) => {
    await c.send(payload);
    const f = await c.next();
    isFail(f, code, opts);
    await inSync(c);
    return f;
  };

  await check(S, '"OP" is not "op": INVALID_REQUEST echoing the id; connection stays in sync', async () => {
    await session(main, (c) => rejected(c, { v: 1, id: 'case1', OP: 'list_providers' }, 'INVALID_REQUEST', { id: 'case1' }));
  });

  await check(S, 'payload member "Provider" is not "provider": INVALID_REQUEST', async () => {
    await session(main, (c) => rejected(c, { v: 1, id: 'case2', op: 'get_token', payload: { Provider: 'anthropic' } }, 'INVALID_REQUEST', { id: 'case2' }));
  });

  await check(S, 'envelope with both "op" and "OP": "OP" is an ignored unknown member', async () => {
    await session(main, async (c) => {
      const f = await c.callText('{"id":"case3","op":"has_api_key","OP":"get_api_key","payload":{"name":"anthropic"}}', 'case3');
      sameJSON(isOk(f), { exists: true }, 'data');
    });
  });

  await check(S, 'duplicate top-level member "op" is INVALID_REQUEST', async () => {
    await session(main, (c) => rejected(c, '{"v":1,"id":"dup1","op":"list_providers","op":"list_providers"}'));
  });
  await check(S, 'duplicate top-level member "id" (same value) is INVALID_REQUEST', async () => {
    await session(main, (c) => rejected(c, '{"v":1,"id":"dup2","id":"dup2","op":"list_providers"}'));
  });
  await check(S, 'duplicate member inside payload is INVALID_REQUEST', async () => {
    await session(main, (c) => rejected(c, '{"v":1,"id":"dup3","op":"get_token","payload":{"provider":"qwen","provider":"qwen"}}'));
  });
  await check(S, 'duplicate member inside payload.token of save_token is INVALID_REQUEST and nothing is stored', async () => {
    await session(main, async (c) => {
      await rejected(c, '{"v":1,"id":"dup4","op":"save_token","payload":{"provider":"dupprov","token":{"access_token":"at-dup-NEW","access_token":"at-dup-NEW","n":2}}}');
      const f = await c.call('get_token', { provider: 'dupprov' });
      const d = isOk(f);
      expect(d.access_token === 'at-dup-orig' && d.n === 1, `token changed: ${f}`);
    });
  });
  await check(S, 'duplicate member deep inside a token (nested object) is INVALID_REQUEST and nothing is stored', async () => {
    await session(main, async (c) => {
      await rejected(c, '{"v":1,"id":"dup5","op":"save_token","payload":{"provider":"dupprov","token":{"access_token":"at-dup-NEW2","meta":{"a":{"b":1,"b":2}}}}}');
      const d = isOk(await c.call('get_token', { provider: 'dupprov' }));
      expect(d.access_token === 'at-dup-orig', `token changed: ${JSON.stringify(d)}`);
    });
  });
  await check(S, 'duplicate member inside an (ignored) unknown envelope member is INVALID_REQUEST', async () => {
    await session(main, (c) => rejected(c, '{"v":1,"id":"dup6","op":"list_providers","extra":{"k":1,"k":1}}'));
  });
  await check(S, 'duplicate member written once plainly and once with a \\u escape ("op", "o\\u0070") is INVALID_REQUEST', async () => {
    await session(main, (c) => rejected(c, '{"v":1,"id":"dup7","op":"list_providers","o\\u0070":"list_providers"}'));
  });

  const utf8Frame = (bytes) => Buffer.concat([
    Buffer.from('{"v":1,"id":"utf","op":"list_providers","note":"a'), Buffer.from(bytes), Buffer.from('b"}'),
  ]);
  await check(S, 'invalid UTF-8 byte 0xFF inside an ignored envelope string is INVALID_REQUEST; connection stays in sync', async () => {
    await session(main, (c) => rejected(c, utf8Frame([0xff])));
  });
  await check(S, 'overlong UTF-8 (C0 AF) and UTF-8-encoded surrogate (ED A0 80) are INVALID_REQUEST', async () => {
    await session(main, async (c) => {
      await rejected(c, utf8Frame([0xc0, 0xaf]));
      await rejected(c, utf8Frame([0xed, 0xa0, 0x80]));
      await rejected(c, utf8Frame([0xe2, 0x82])); // truncated sequence
    });
  });
  await check(S, 'invalid UTF-8 inside a save_token token is INVALID_REQUEST and nothing is stored', async () => {
    await session(main, async (c) => {
      await rejected(c, Buffer.concat([
        Buffer.from('{"v":1,"id":"utf2","op":"save_token","payload":{"provider":"dupprov","token":{"access_token":"at-dup-'),
        Buffer.from([0xfe]), Buffer.from('"}}}'),
      ]));
      const d = isOk(await c.call('get_token', { provider: 'dupprov' }));
      expect(d.access_token === 'at-dup-orig', `token changed: ${JSON.stringify(d)}`);
    });
  });

  await check(S, 'a frame that is a JSON array / string / number / null is INVALID_REQUEST with id "unknown"', async () => {
    await session(main, async (c) => {
      for (const p of ['[{"id":"arr","op":"list_providers"}]', '"list_providers"', '42', 'null', 'true']) {
        await c.send(p);
        isFail(await c.next(), 'INVALID_REQUEST', { id: 'unknown' });
      }
      await inSync(c);
    });
  });
  await check(S, 'a frame that is not JSON at all is INVALID_REQUEST with id "unknown"; connection stays in sync', async () => {
    await session(main, async (c) => {
      for (const p of ['hello', '{', '{"id":"x","op":}', '{"id":"x" "op":"list_providers"}', "{'id':'x'}"]) {
        await c.send(p);
        isFail(await c.next(), 'INVALID_REQUEST', { id: 'unknown' });
      }
      await inSync(c);
    });
  });
  await check(S, 'trailing bytes after the object ("}x", "}{}", "}]") are INVALID_REQUEST', async () => {
    await session(main, async (c) => {
      await rejected(c, '{"v":1,"id":"tr1","op":"list_providers"}x');
      await rejected(c, '{"v":1,"id":"tr2","op":"list_providers"}{}');
      await rejected(c, '{"v":1,"id":"tr3","op":"list_providers"}]');
    });
  });

  await check(S, 'unknown envelope members (object, array, number, string) are ignored', async () => {
    await session(main, async (c) => {
      const f = await c.callText('{"v":1,"id":"unk1","op":"get_api_key","payload":{"name":"xai-key"},"trace":{"a":[1,2]},"list":[],"n":1.5e3,"s":"x","capabilityToken":"ct"}', 'unk1');
      sameJSON(isOk(f), { key: KEYS['xai-key'] }, 'data');
    });
  });
  await check(S, 'unknown payload member is INVALID_REQUEST and the message does not contain its value', async () => {
    await session(main, async (c) => {
      const f = await c.call('get_token', { provider: 'qwen', colour: 'VALUE-purple-zz9' }, { id: 'unkp' });
      isFail(f, 'INVALID_REQUEST', { id: 'unkp', hides: ['VALUE-purple-zz9'] });
      await inSync(c);
    });
  });
  await check(S, 'unknown payload member for an op with no payload members (list_providers {"x":1}) is INVALID_REQUEST', async () => {
    await session(main, async (c) => {
      isFail(await c.call('list_providers', { x: 1 }, { id: 'unkp2' }), 'INVALID_REQUEST', { id: 'unkp2' });
      isFail(await c.call('list_api_keys', { name: 'anthropic' }, { id: 'unkp3' }), 'INVALID_REQUEST', { id: 'unkp3' });
      await inSync(c);
    });
  });
  await check(S, 'unknown members inside the token of save_token are accepted (free-form) and returned', async () => {
    await session(main, async (c) => {
      const text = '{"id":"ff1","op":"save_token","payload":{"provider":"freeform","token":{"access_token":"at-ff","whatever":{"x":[true,false]},"Access_Token":"case-kept"}}}';
      sameJSON(isOk(await c.callText(text, 'ff1')), {}, 'save data');
      const f = await c.call('get_token', { provider: 'freeform' });
      const d = rawDiff(parseRaw('{"access_token":"at-ff","whatever":{"x":[true,false]},"Access_Token":"case-kept"}'), member(f.tree, 'data'));
      expect(!d, `${d}: ${f}`);
    });
  });
  await check(S, '"bucket": null means absent (the default bucket)', async () => {
    await session(main, async (c) => {
      const a = await c.call('get_token', { provider: 'anthropic', bucket: null });
      const b = await c.call('get_token', { provider: 'anthropic' });
      isOk(a);
      const d = rawDiff(member(b.tree, 'data'), member(a.tree, 'data'));
      expect(!d, `bucket null differs from absent: ${d}`);
      expect(isOk(a).access_token === 'at-anthropic-default-A1', `${a}`);
    });
  });
  await check(S, '"payload": null and an absent payload mean {}', async () => {
    await session(main, async (c) => {
      const a = await c.call('list_api_keys', null);
      const b = await c.call('list_api_keys');
      sameJSON(isOk(a), isOk(b), 'payload null vs absent');
    });
  });
  await check(S, 'required member given as null counts as absent (get_token {"provider":null}) -> INVALID_REQUEST', async () => {
    await session(main, async (c) => {
      isFail(await c.call('get_token', { provider: null }, { id: 'nullp' }), 'INVALID_REQUEST', { id: 'nullp' });
      await inSync(c);
    });
  });
}

// ---------------------------------------------------------------------------
// "Handshake"
// ---------------------------------------------------------------------------

async function handshakeChecks(main) {
  const S = 'Handshake';

  const accepted = async (msg) => {
    await session(main, async (c) => {
      await c.send(msg);
      const f = await c.next();
      sameJSON(f.json, HANDSHAKE_OK, `reply to ${show(msg)}`);
      await inSync(c);
    }, { handshake: false });
  };
  const refused = async (msg) => {
    await session(main, async (c) => {
      await c.send(msg);
      const f = await c.next();
      sameJSON(f.json, HANDSHAKE_BAD, `reply to ${show(msg)}`);
      await c.expectClosedQuietly(3000);
    }, { handshake: false });
  };

  await check(S, 'canonical handshake gets exactly {"v":1,"op":"handshake","ok":true,"data":{"version":1}}', () => accepted(HANDSHAKE));
  await check(S, 'v2-style handshake {"v":2,...,"minVersion":1,"maxVersion":2,"capabilityToken":...} negotiates version 1', () =>
    accepted({ v: 2, op: 'handshake', payload: { minVersion: 1, maxVersion: 2, capabilityToken: 'cap-123' } }));
  await check(S, 'v:1 handshake without payload is accepted', () => accepted({ v: 1, op: 'handshake' }));
  await check(S, 'v:1 handshake with payload {} is accepted', () => accepted({ v: 1, op: 'handshake', payload: {} }));
  await check(S, 'v:1 handshake with payload null is accepted', () => accepted({ v: 1, op: 'handshake', payload: null }));
  await check(S, 'v:1 handshake with minVersion and maxVersion null is accepted', () =>
    accepted({ v: 1, op: 'handshake', payload: { minVersion: null, maxVersion: null } }));
  await check(S, 'other compatible ranges are accepted: {0,5}, {-1,1}, {1,3} without v', async () => {
    await accepted({ v: 1, op: 'handshake', payload: { minVersion: 0, maxVersion: 5 } });
    await accepted({ v: 1, op: 'handshake', payload: { minVersion: -1, maxVersion: 1 } });
    await accepted({ op: 'handshake', payload: { minVersion: 1, maxVersion: 3 } });
  });
  await check(S, 'maxVersion a very large integer (100000000000000000000) is accepted', () =>
    accepted('{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":100000000000000000000}}'));

  const hs = (payload, v = 1) => ({ v, op: 'handshake', payload });
  await check(S, 'only minVersion present -> UNKNOWN_VERSION, then close', () => refused(hs({ minVersion: 1 })));
  await check(S, 'only maxVersion present -> UNKNOWN_VERSION, then close', () => refused(hs({ maxVersion: 1 })));
  await check(S, 'minVersion 1 with maxVersion null (only one present) -> UNKNOWN_VERSION, then close', () =>
    refused(hs({ minVersion: 1, maxVersion: null })));
  await check(S, 'minVersion > maxVersion ({2,1}) -> UNKNOWN_VERSION, then close', () => refused(hs({ minVersion: 2, maxVersion: 1 })));
  await check(S, 'maxVersion < 1 ({0,0}, {-3,-1}) -> UNKNOWN_VERSION, then close', async () => {
    await refused(hs({ minVersion: 0, maxVersion: 0 }));
    await refused(hs({ minVersion: -3, maxVersion: -1 }));
  });
  await check(S, 'minVersion > 1 ({2,3}) -> UNKNOWN_VERSION, then close', () => refused(hs({ minVersion: 2, maxVersion: 3 })));
  await check(S, 'non-integer versions (1.0, 1e0, "1", true, 1.5) -> UNKNOWN_VERSION, then close', async () => {
    await refused('{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1.0}}');
    await refused('{"v":1,"op":"handshake","payload":{"minVersion":1e0,"maxVersion":1}}');
    await refused('{"v":1,"op":"handshake","payload":{"minVersion":"1","maxVersion":1}}');
    await refused('{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":true}}');
    await refused('{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1.5}}');
  });
  await check(S, 'no min/max and v not the integer 1 (2, "1", 1.0, absent) -> UNKNOWN_VERSION, then close', async () => {
    await refused({ v: 2, op: 'handshake', payload: {} });
    await refused({ v: '1', op: 'handshake' });
    await refused('{"v":1.0,"op":"handshake"}');
    await refused({ op: 'handshake', payload: {} });
  });

  await check(S, 'non-handshake first frame -> INVALID_REQUEST "handshake required" echoing the id, then close', async () => {
    await session(main, async (c) => {
      await c.send({ v: 1, id: 'first-1', op: 'list_providers' });
      const f = await c.next();
      isFail(f, 'INVALID_REQUEST', { id: 'first-1', error: 'handshake required' });
      await c.expectClosedQuietly(3000);
    }, { handshake: false });
  });
  await check(S, 'non-handshake first frame without an id -> "handshake required" with id "unknown", then close', async () => {
    await session(main, async (c) => {
      await c.send({ v: 1, op: 'get_token', payload: { provider: 'anthropic' } });
      const f = await c.next();
      isFail(f, 'INVALID_REQUEST', { id: 'unknown', error: 'handshake required' });
      await c.expectClosedQuietly(3000);
    }, { handshake: false });
  });
  await check(S, 'first frame not valid JSON -> INVALID_REQUEST with id "unknown", then close', async () => {
    await session(main, async (c) => {
      await c.send('{"v":1,"op":"handshake",');
      isFail(await c.next(), 'INVALID_REQUEST', { id: 'unknown' });
      await c.expectClosedQuietly(3000);
    }, { handshake: false });
  });
  await check(S, 'first frame a JSON array -> INVALID_REQUEST with id "unknown", then close', async () => {
    await session(main, async (c) => {
      await c.send('[{"v":1,"op":"handshake"}]');
      isFail(await c.next(), 'INVALID_REQUEST', { id: 'unknown' });
      await c.expectClosedQuietly(3000);
    }, { handshake: false });
  });
  await check(S, 'handshake frame with a duplicate member is INVALID_REQUEST (JSON rules apply to every frame)', async () => {
    await session(main, async (c) => {
      await c.send('{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"maxVersion":1}}');
      isFail(await c.next(), 'INVALID_REQUEST');
    }, { handshake: false });
  });
  await check(S, 'a second handshake after a successful one is INVALID_REQUEST "unknown operation"; connection stays open', async () => {
    await session(main, async (c) => {
      const f = await c.call('handshake', { minVersion: 1, maxVersion: 1 }, { id: 'hs2' });
      isFail(f, 'INVALID_REQUEST', { id: 'hs2', error: 'unknown operation' });
      await inSync(c);
    });
  });
  await check(S, 'the handshake does not trigger any other frame (server silent after the reply)', async () => {
    await session(main, async (c) => c.expectSilent(200));
  });
}

// ---------------------------------------------------------------------------
// "Requests" (id, op, payload, names) -- rate limit has its own section below
// ---------------------------------------------------------------------------

async function requestChecks(main) {
  const S = 'Requests';

  await check(S, 'string id echoed exactly, including non-ASCII and escapes', async () => {
    await session(main, async (c) => {
      for (const id of ['8c1d-42', 'é€😀 id', 'quote"back\\slash', 'unknown-ish']) {
        const f = await c.call('list_api_keys', undefined, { id });
        isOk(f, id);
      }
    });
  });
  await check(S, 'integer ids are echoed as decimal strings (42, 0, -7)', async () => {
    await session(main, async (c) => {
      for (const [text, want] of [['42', '42'], ['0', '0'], ['-7', '-7']]) {
        const f = await c.callText(`{"v":1,"id":${text},"op":"list_api_keys"}`, want);
        isOk(f, want);
      }
    });
  });
  await check(S, 'a large integer id (123456789012345678901234567890) is echoed as its decimal text', async () => {
    await session(main, async (c) => {
      const want = '123456789012345678901234567890';
      await c.send(`{"v":1,"id":${want},"op":"list_api_keys"}`);
      const f = await c.next();
      isOk(f, want);
    });
  });

  const unknownId = async (c, text) => {
    await c.send(text);
    const f = await c.next();
    isFail(f, 'INVALID_REQUEST', { id: 'unknown' });
  };
  await check(S, 'missing id -> INVALID_REQUEST with id "unknown"; connection stays in sync', async () => {
    await session(main, async (c) => {
      await unknownId(c, '{"v":1,"op":"list_providers"}');
      await unknownId(c, '{"v":1,"ID":"upper","op":"list_providers"}');
      await inSync(c);
    });
  });
  await check(S, 'empty-string id -> id "unknown"', async () => {
    await session(main, async (c) => {
      await unknownId(c, '{"v":1,"id":"","op":"list_providers"}');
      await inSync(c);
    });
  });
  await check(S, 'id of another type (true, false, null, 1.5, {}, []) -> id "unknown"', async () => {
    await session(main, async (c) => {
      for (const v of ['true', 'false', 'null', '1.5', '{}', '["a"]']) await unknownId(c, `{"v":1,"id":${v},"op":"list_providers"}`);
      await inSync(c);
    });
  });
  await check(S, 'id of 256 bytes is echoed; 257 bytes -> id "unknown"', async () => {
    await session(main, async (c) => {
      const id256 = 'i'.repeat(256);
      isOk(await c.call('list_api_keys', undefined, { id: id256 }), id256);
      await unknownId(c, JSON.stringify({ v: 1, id: 'i'.repeat(257), op: 'list_providers' }));
      await inSync(c);
    });
  });
  await check(S, 'id length is counted in bytes: 128 x "é" (256 bytes) echoed, 129 x "é" (258 bytes) -> "unknown"', async () => {
    await session(main, async (c) => {
      const ok = 'é'.repeat(128);
      isOk(await c.call('list_api_keys', undefined, { id: ok }), ok);
      await unknownId(c, JSON.stringify({ v: 1, id: 'é'.repeat(129), op: 'list_providers' }));
      await unknownId(c, JSON.stringify({ v: 1, id: '€'.repeat(100), op: 'list_providers' }));
      await inSync(c);
    });
  });
  await check(S, 'unknown op -> INVALID_REQUEST "unknown operation" echoing the id', async () => {
    await session(main, async (c) => {
      for (const op of ['get_tokens', 'GET_TOKEN', 'Get_Token', '', 'delete_api_key']) {
        const f = await c.call(op, {}, { id: `op-${op}` });
        isFail(f, 'INVALID_REQUEST', { id: `op-${op}`, error: 'unknown operation' });
      }
      await inSync(c);
    });
  });
  await check(S, 'missing op or non-string op -> INVALID_REQUEST echoing the id', async () => {
    await session(main, async (c) => {
      isFail(await c.callText('{"v":1,"id":"noop"}', 'noop'), 'INVALID_REQUEST', { id: 'noop' });
      isFail(await c.callText('{"v":1,"id":"numop","op":5}', 'numop'), 'INVALID_REQUEST', { id: 'numop' });
      isFail(await c.callText('{"v":1,"id":"nullop","op":null}', 'nullop'), 'INVALID_REQUEST', { id: 'nullop' });
      await inSync(c);
    });
  });
  await check(S, 'non-object payload (array, string, number, true) -> INVALID_REQUEST echoing the id', async () => {
    await session(main, async (c) => {
      for (const [k, p] of [['a', '[]'], ['s', '"anthropic"'], ['n', '1'], ['b', 'true']]) {
        const id = `np-${k}`;
        isFail(await c.callText(`{"v":1,"id":"${id}","op":"list_providers","payload":${p}}`, id), 'INVALID_REQUEST', { id });
      }
      await inSync(c);
    });
  });
  await check(S, '"v" is not checked after the handshake (v:99, v:"x", v absent)', async () => {
    await session(main, async (c) => {
      isOk(await c.callText('{"v":99,"id":"v99","op":"list_api_keys"}', 'v99'));
      isOk(await c.callText('{"v":"x","id":"vx","op":"list_api_keys"}', 'vx'));
      isOk(await c.callText('{"id":"vnone","op":"list_api_keys"}', 'vnone'));
    });
  });
  await check(S, 'missing or mistyped required payload members -> INVALID_REQUEST', async () => {
    await session(main, async (c) => {
      const cases = [
        ['get_token', {}], ['get_token', { provider: 5 }], ['get_token', { provider: 'anthropic', bucket: 7 }],
        ['get_token', { provider: ['anthropic'] }], ['list_buckets', {}], ['get_api_key', {}],
        ['has_api_key', { name: true }], ['get_bucket_stats', {}], ['remove_token', {}], ['refresh_token', {}],
        ['save_token', { provider: 'anthropic' }], ['list_buckets', { provider: 'anthropic', bucket: 'work' }],
        ['get_api_key', { name: 'anthropic', provider: 'anthropic' }],
      ];
      for (const [op, payload] of cases) {
        const f = await c.call(op, payload);
        expect(f.json?.ok === false && f.json.code === 'INVALID_REQUEST', `${op} ${JSON.stringify(payload)}: ${f}`);
      }
      await inSync(c);
    });
  });

  const badNames = ['bad/SLASHNAME', 'bad SPACENAME', 'n'.repeat(65), '', 'bad\u00e9NAME', 'bad\nNLNAME', 'bad:COLON', '..%2F'];
  const nameCheck = async (c, build, what) => {
    for (const n of badNames) {
      const [op, payload] = build(n);
      const f = await c.call(op, payload);
      expect(f.json?.ok === false && f.json.code === 'INVALID_REQUEST', `${what} ${JSON.stringify(n)}: ${f}`);
      if (n.length >= 3) expect(!f.json.error.includes(n), `error text ${JSON.stringify(f.json.error)} contains the name`);
    }
    await inSync(c);
  };
  await check(S, 'invalid provider names (slash, space, 65 chars, empty, non-ASCII, newline, colon) -> INVALID_REQUEST, value not in message', async () => {
    await session(main, (c) => nameCheck(c, (n) => ['get_token', { provider: n }], 'provider'));
  });
  await check(S, 'invalid bucket names -> INVALID_REQUEST, value not in message', async () => {
    await session(main, (c) => nameCheck(c, (n) => ['get_token', { provider: 'anthropic', bucket: n }], 'bucket'));
  });
  await check(S, 'invalid API key names (get_api_key and has_api_key) -> INVALID_REQUEST, value not in message', async () => {
    await session(main, async (c) => {
      await nameCheck(c, (n) => ['get_api_key', { name: n }], 'get_api_key name');
      await nameCheck(c, (n) => ['has_api_key', { name: n }], 'has_api_key name');
    });
  });
  await check(S, 'invalid names are refused by save_token and list_buckets too', async () => {
    await session(main, async (c) => {
      await nameCheck(c, (n) => ['save_token', { provider: n, token: { access_token: 'x' } }], 'save_token provider');
      await nameCheck(c, (n) => ['save_token', { provider: 'namecheck', bucket: n, token: { access_token: 'x' } }], 'save_token bucket');
      await nameCheck(c, (n) => ['list_buckets', { provider: n }], 'list_buckets provider');
    });
  });
  await check(S, 'names of 64 characters using every allowed character class are accepted', async () => {
    await session(main, async (c) => {
      const prov = 'Az09._@-'.padEnd(64, 'Z');
      const bucket = 'b'.repeat(63) + '@';
      expect(prov.length === 64, 'test bug');
      isOk(await c.call('save_token', { provider: prov, bucket, token: { access_token: 'at-longname' } }));
      const d = isOk(await c.call('get_token', { provider: prov, bucket }));
      expect(d.access_token === 'at-longname', JSON.stringify(d));
      sameJSON(isOk(await c.call('list_buckets', { provider: prov })), { buckets: [bucket] }, 'list_buckets');
      sameJSON(isOk(await c.call('has_api_key', { name: 'N'.repeat(64) })), { exists: false }, 'has_api_key 64 chars');
      isOk(await c.call('remove_token', { provider: prov, bucket }));
    });
  });
  await check(S, 'an absent bucket means "default"', async () => {
    await session(main, async (c) => {
      const a = await c.call('get_token', { provider: 'openai' });
      const b = await c.call('get_token', { provider: 'openai', bucket: 'default' });
      const d = rawDiff(member(b.tree, 'data'), member(a.tree, 'data'));
      expect(!d, d);
      sameJSON(isOk(await c.call('get_bucket_stats', { provider: 'openai' })), { bucket: 'default', requestCount: 0, percentage: 0 }, 'stats');
    });
  });
}

// ---------------------------------------------------------------------------
// "Operations" and "Responses"
// ---------------------------------------------------------------------------

/** Runs first, before any check changes the store. */
async function initialListCheck(main) {
  await check('Operations', 'list_providers returns all providers of the store, sorted (before any change)', async () => {
    await session(main, async (c) => sameJSON(isOk(await c.call('list_providers')), { providers: MAIN_PROVIDERS }, 'data'));
  });
}

async function operationChecks(main) {
  const S = 'Operations';
  const tokenWithoutRefresh = (text) => withoutMember(parseRaw(text), 'refresh_token');

  await check(S, 'get_token returns the stored token without refresh_token, every other member byte-exact', async () => {
    await session(main, async (c) => {
      const f = await c.call('get_token', { provider: 'anthropic', bucket: 'default' });
      isOk(f);
      const d = rawDiff(tokenWithoutRefresh(T.anthropicDefault), member(f.tree, 'data'));
      expect(!d, `${d}; frame ${f}`);
    });
  });
  await check(S, 'get_token: raw response text has 12345678901234567890, 1.50, 1.0E+2, -0.0 exactly as written', async () => {
    await session(main, async (c) => {
      const f = await c.call('get_token', { provider: 'anthropic' });
      for (const [k, v] of [['big', '12345678901234567890'], ['price', '1.50'], ['sci', '1.0E+2'], ['negzero', '-0.0'], ['tiny', '-3e-7']]) {
        expect(new RegExp(`"${k}"\\s*:\\s*${escapeRe(v)}[,}\\s]`).test(f.text), `"${k}":${v} not found in ${f}`);
      }
      expect(f.text.includes('12345678901234567890123'), `nested big integer not found in ${f}`);
    });
  });
  await check(S, 'get_token: the refresh_token member is absent (not null, not empty)', async () => {
    await session(main, async (c) => {
      for (const [p, b] of [['anthropic', 'default'], ['anthropic', 'work'], ['openai', 'default'], ['minimal', 'default']]) {
        const f = await c.call('get_token', { provider: p, bucket: b });
        expect(isOk(f) && !('refresh_token' in f.json.data), `${p}/${b}: ${f}`);
        expect(!f.text.includes('refresh_token'), `${p}/${b}: "refresh_token" text present: ${f}`);
      }
    });
  });
  await check(S, 'get_token adds no member: a stored {access_token, refresh_token} comes back as exactly {access_token}', async () => {
    await session(main, async (c) => {
      sameJSON(isOk(await c.call('get_token', { provider: 'minimal' })), { access_token: 'at-minimal-M1' }, 'minimal');
      sameJSON(isOk(await c.call('get_token', { provider: 'qwen' })), { access_token: 'at-qwen-Q1', resource_url: 'portal.qwen.ai' }, 'qwen');
      const f = await c.call('get_token', { provider: 'openai' });
      const d = rawDiff(tokenWithoutRefresh(T.openai), member(f.tree, 'data'));
      expect(!d, `${d}: ${f}`);
    });
  });
  await check(S, 'get_token of other buckets returns their own tokens', async () => {
    await session(main, async (c) => {
      for (const [b, t] of [['work', T.anthropicWork], ['alpha', T.anthropicAlpha], ['beta', T.anthropicBeta]]) {
        const f = await c.call('get_token', { provider: 'anthropic', bucket: b });
        const d = rawDiff(tokenWithoutRefresh(t), member(f.tree, 'data'));
        expect(!d, `${b}: ${d}: ${f}`);
      }
    });
  });
  await check(S, 'get_token NOT_FOUND for an unknown provider and for an unknown bucket of a known provider', async () => {
    await session(main, async (c) => {
      isFail(await c.call('get_token', { provider: 'nosuchprovider' }, { id: 'nf1' }), 'NOT_FOUND', { id: 'nf1', hides: ['nosuchprovider'] });
      isFail(await c.call('get_token', { provider: 'anthropic', bucket: 'nosuchbucket' }, { id: 'nf2' }), 'NOT_FOUND', { id: 'nf2', hides: ['nosuchbucket'] });
      isFail(await c.call('get_token', { provider: 'qwen', bucket: 'work' }, { id: 'nf3' }), 'NOT_FOUND', { id: 'nf3' });
      await inSync(c);
    });
  });

  await check(S, 'save_token overlays members on the stored token; the new refresh_token is ignored and never returned', async () => {
    await session(main, async (c) => {
      const newRt = RT('merge-new');
      const text = `{"v":1,"id":"merge1","op":"save_token","payload":{"provider":"mergeprov","token":{"access_token":"at-merge-new","refresh_token":"${newRt}","scope":"s2","added":12345678901234567890.000,"frac":0.10}}}`;
      sameJSON(isOk(await c.callText(text, 'merge1')), {}, 'save data');
      const f = await c.call('get_token', { provider: 'mergeprov' });
      const want = parseRaw('{"access_token":"at-merge-new","account_id":"acct-merge","expiry":1893456000,"scope":"s2","keepnum":98765432109876543210,"added":12345678901234567890.000,"frac":0.10}');
      const d = rawDiff(want, member(f.tree, 'data'));
      expect(!d, `${d}: ${f}`);
    });
  });
  await check(S, 'save_token for a new provider stores the token without its refresh token; numbers kept as written', async () => {
    await session(main, async (c) => {
      const rt = RT('newprov');
      const tokenText = `{"access_token":"at-newprov","refresh_token":"${rt}","expiry":1893456000.5,"account_id":"acct-new","n":12345678901234567890,"f":1.50,"e":-1.25E-10}`;
      sameJSON(isOk(await c.callText(`{"v":1,"id":"new1","op":"save_token","payload":{"provider":"newprov","token":${tokenText}}}`, 'new1')), {}, 'save data');
      const f = await c.call('get_token', { provider: 'newprov' });
      const d = rawDiff(tokenWithoutRefresh(tokenText), member(f.tree, 'data'));
      expect(!d, `${d}: ${f}`);
      sameJSON(isOk(await c.call('get_bucket_stats', { provider: 'newprov' })), { bucket: 'default', requestCount: 0, percentage: 0 }, 'stats');
    });
  });
  await check(S, 'save_token for a new bucket of an existing provider; "bucket": null saves into default', async () => {
    await session(main, async (c) => {
      isOk(await c.call('save_token', { provider: 'qwen', bucket: 'extra', token: { access_token: 'at-qwen-extra', refresh_token: RT('qwen-extra') } }));
      sameJSON(isOk(await c.call('get_token', { provider: 'qwen', bucket: 'extra' })), { access_token: 'at-qwen-extra' }, 'new bucket');
      isOk(await c.call('save_token', { provider: 'nullbucket', bucket: null, token: { access_token: 'at-nullbucket' } }));
      sameJSON(isOk(await c.call('get_token', { provider: 'nullbucket', bucket: 'default' })), { access_token: 'at-nullbucket' }, 'null bucket');
    });
  });
  await check(S, 'save_token keeps very large / small numbers as written (1e400, 0.1e-999, 100000000000000000000000000001)', async () => {
    await session(main, async (c) => {
      const tokenText = '{"access_token":"at-extreme","huge":1e400,"small":0.1e-999,"long":100000000000000000000000000001,"neg":-100000000000000000000000000001}';
      isOk(await c.callText(`{"v":1,"id":"ext1","op":"save_token","payload":{"provider":"extreme","token":${tokenText}}}`, 'ext1'));
      const f = await c.call('get_token', { provider: 'extreme' });
      const d = rawDiff(parseRaw(tokenText), member(f.tree, 'data'));
      expect(!d, `${d}: ${f}`);
    });
  });
  await check(S, 'save_token rejects a token that is missing, not an object, or lacks a non-empty string access_token; nothing stored', async () => {
    await session(main, async (c) => {
      const cases = [
        { provider: 'dupprov' }, { provider: 'dupprov', token: null }, { provider: 'dupprov', token: 'at-x' },
        { provider: 'dupprov', token: ['at-x'] }, { provider: 'dupprov', token: {} }, { provider: 'dupprov', token: { access_token: '' } },
        { provider: 'dupprov', token: { access_token: 5 } }, { provider: 'dupprov', token: { access_token: null } },
        { provider: 'dupprov', token: { refresh_token: RT('noaccess') } },
      ];
      for (const p of cases) {
        const f = await c.call('save_token', p);
        expect(f.json?.ok === false && f.json.code === 'INVALID_REQUEST', `${JSON.stringify(p)}: ${f}`);
      }
      const d = isOk(await c.call('get_token', { provider: 'dupprov' }));
      expect(d.access_token === 'at-dup-orig', `token changed: ${JSON.stringify(d)}`);
    });
  });
  await check(S, 'remove_token of a present token returns {} and the token is gone; the other bucket stays', async () => {
    await session(main, async (c) => {
      sameJSON(isOk(await c.call('remove_token', { provider: 'removeprov' })), {}, 'remove data');
      isFail(await c.call('get_token', { provider: 'removeprov' }), 'NOT_FOUND');
      sameJSON(isOk(await c.call('get_token', { provider: 'removeprov', bucket: 'keep' })), { access_token: 'at-remove-keep' }, 'other bucket');
      sameJSON(isOk(await c.call('list_buckets', { provider: 'removeprov' })), { buckets: ['keep'] }, 'list_buckets');
    });
  });
  await check(S, 'remove_token of an absent token (unknown provider, unknown bucket, already removed) returns {}', async () => {
    await session(main, async (c) => {
      sameJSON(isOk(await c.call('remove_token', { provider: 'neverexisted' })), {}, 'unknown provider');
      sameJSON(isOk(await c.call('remove_token', { provider: 'anthropic', bucket: 'neverexisted' })), {}, 'unknown bucket');
      sameJSON(isOk(await c.call('remove_token', { provider: 'removeprov', bucket: 'default' })), {}, 'already removed');
    });
  });
  await check(S, 'save after remove stores a fresh token (no stale members)', async () => {
    await session(main, async (c) => {
      isOk(await c.call('save_token', { provider: 'removeprov', token: { access_token: 'at-remove-again' } }));
      sameJSON(isOk(await c.call('get_token', { provider: 'removeprov' })), { access_token: 'at-remove-again' }, 'data');
    });
  });
  await check(S, 'list_providers after saves includes the new providers and is sorted', async () => {
    await session(main, async (c) => {
      const d = isOk(await c.call('list_providers'));
      expect(Array.isArray(d.providers), JSON.stringify(d));
      for (const p of ['newprov', 'nullbucket', 'extreme', 'freeform', ...MAIN_PROVIDERS]) expect(d.providers.includes(p), `${p} missing from ${JSON.stringify(d)}`);
      expect(JSON.stringify(d.providers) === JSON.stringify([...d.providers].sort()), `not sorted: ${JSON.stringify(d)}`);
    });
  });
  await check(S, 'list_buckets returns the buckets of a provider, sorted', async () => {
    await session(main, async (c) => {
      sameJSON(isOk(await c.call('list_buckets', { provider: 'anthropic' })), { buckets: ['alpha', 'beta', 'default', 'work'] }, 'anthropic');
      sameJSON(isOk(await c.call('list_buckets', { provider: 'openai' })), { buckets: ['default'] }, 'openai');
    });
  });
  await check(S, 'list_buckets of a provider without tokens is {"buckets":[]} (an array, not null)', async () => {
    await session(main, async (c) => {
      const f = await c.call('list_buckets', { provider: 'nobucketsprovider' });
      sameJSON(isOk(f), { buckets: [] }, 'data');
    });
  });
  await check(S, 'get_bucket_stats returns exactly {"bucket":b,"requestCount":0,"percentage":0}', async () => {
    await session(main, async (c) => {
      sameJSON(isOk(await c.call('get_bucket_stats', { provider: 'anthropic', bucket: 'work' })), { bucket: 'work', requestCount: 0, percentage: 0 }, 'work');
      sameJSON(isOk(await c.call('get_bucket_stats', { provider: 'anthropic' })), { bucket: 'default', requestCount: 0, percentage: 0 }, 'default');
    });
  });
  await check(S, 'get_bucket_stats NOT_FOUND for an unknown provider or bucket', async () => {
    await session(main, async (c) => {
      isFail(await c.call('get_bucket_stats', { provider: 'nosuchprovider' }), 'NOT_FOUND');
      isFail(await c.call('get_bucket_stats', { provider: 'anthropic', bucket: 'nosuchbucket' }), 'NOT_FOUND');
    });
  });
  await check(S, 'get_api_key returns exactly {"key":value}', async () => {
    await session(main, async (c) => {
      for (const [n, v] of Object.entries(KEYS)) sameJSON(isOk(await c.call('get_api_key', { name: n })), { key: v }, n);
    });
  });
  await check(S, 'get_api_key NOT_FOUND for an unknown name (name not in the message)', async () => {
    await session(main, async (c) => {
      isFail(await c.call('get_api_key', { name: 'nosuchkeyname' }, { id: 'gak' }), 'NOT_FOUND', { id: 'gak', hides: ['nosuchkeyname'] });
    });
  });
  await check(S, 'list_api_keys returns the key names, sorted', async () => {
    await session(main, async (c) => sameJSON(isOk(await c.call('list_api_keys')), { keys: Object.keys(KEYS).sort() }, 'data'));
  });
  await check(S, 'has_api_key returns {"exists":true} / {"exists":false}', async () => {
    await session(main, async (c) => {
      sameJSON(isOk(await c.call('has_api_key', { name: 'gemini.key@1' })), { exists: true }, 'present');
      sameJSON(isOk(await c.call('has_api_key', { name: 'nosuchkeyname' })), { exists: false }, 'absent');
      sameJSON(isOk(await c.call('has_api_key', { name: 'ANTHROPIC' })), { exists: false }, 'names are case-sensitive');
    });
  });
  await check(S, 'refresh_token -> PROVIDER_NOT_FOUND (memserver has no refresher); the token is unchanged', async () => {
    await session(main, async (c) => {
      isFail(await c.call('refresh_token', { provider: 'anthropic' }, { id: 'rf1' }), 'PROVIDER_NOT_FOUND', { id: 'rf1' });
      isFail(await c.call('refresh_token', { provider: 'anthropic', bucket: 'work' }, { id: 'rf2' }), 'PROVIDER_NOT_FOUND', { id: 'rf2' });
      expect(isOk(await c.call('get_token', { provider: 'anthropic' })).access_token === 'at-anthropic-default-A1', 'token changed');
    });
  });
  await check(S, 'API keys cannot be written or removed over the protocol (set_api_key, save_api_key, remove_api_key are unknown)', async () => {
    await session(main, async (c) => {
      for (const op of ['set_api_key', 'save_api_key', 'remove_api_key', 'delete_api_key']) {
        isFail(await c.call(op, { name: 'anthropic', key: 'x' }), 'INVALID_REQUEST', { error: 'unknown operation' });
      }
      sameJSON(isOk(await c.call('get_api_key', { name: 'anthropic' })), { key: KEYS.anthropic }, 'key unchanged');
    });
  });
}

// ---------------------------------------------------------------------------
// "Requests" step 5: policy
// ---------------------------------------------------------------------------

async function policyChecks(pol) {
  const S = 'Requests/Policy';
  const denied = (f, error, hides = []) => isFail(f, 'UNAUTHORIZED', { error, hides });

  await check(S, 'list_providers lists only allowed providers', async () => {
    await session(pol, async (c) => sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic', 'openai'] }, 'data'));
  });
  await check(S, 'list_buckets lists only allowed buckets', async () => {
    await session(pol, async (c) => sameJSON(isOk(await c.call('list_buckets', { provider: 'anthropic' })), { buckets: ['default', 'work'] }, 'data'));
  });
  await check(S, 'list_api_keys lists only allowed key names', async () => {
    await session(pol, async (c) => sameJSON(isOk(await c.call('list_api_keys')), { keys: ['openai_key'] }, 'data'));
  });
  await check(S, 'list_buckets of a disallowed provider -> UNAUTHORIZED "provider not allowed"', async () => {
    await session(pol, async (c) => {
      denied(await c.call('list_buckets', { provider: 'gemini' }), 'provider not allowed', ['gemini']);
      await inSync(c);
    });
  });
  await check(S, 'allowed provider and bucket are served', async () => {
    await session(pol, async (c) => {
      sameJSON(isOk(await c.call('get_token', { provider: 'anthropic' })), { access_token: 'at-pol-a-default' }, 'default');
      sameJSON(isOk(await c.call('get_token', { provider: 'anthropic', bucket: 'work' })), { access_token: 'at-pol-a-work' }, 'work');
      sameJSON(isOk(await c.call('get_bucket_stats', { provider: 'openai' })), { bucket: 'default', requestCount: 0, percentage: 0 }, 'stats');
      sameJSON(isOk(await c.call('get_api_key', { name: 'openai_key' })), { key: 'sk-pol-KEYVALUE-1' }, 'key');
      sameJSON(isOk(await c.call('has_api_key', { name: 'openai_key' })), { exists: true }, 'has key');
    });
  });
  await check(S, 'disallowed provider -> UNAUTHORIZED "provider not allowed" for get/save/remove/stats/refresh', async () => {
    await session(pol, async (c) => {
      denied(await c.call('get_token', { provider: 'gemini' }), 'provider not allowed', ['gemini']);
      denied(await c.call('save_token', { provider: 'gemini', token: { access_token: 'at-evil' } }), 'provider not allowed');
      denied(await c.call('remove_token', { provider: 'gemini' }), 'provider not allowed');
      denied(await c.call('get_bucket_stats', { provider: 'gemini' }), 'provider not allowed');
      denied(await c.call('refresh_token', { provider: 'gemini' }), 'provider not allowed');
      await inSync(c);
    });
  });
  await check(S, 'disallowed bucket of an allowed provider -> UNAUTHORIZED "bucket not allowed" for get/save/remove/stats/refresh', async () => {
    await session(pol, async (c) => {
      denied(await c.call('get_token', { provider: 'anthropic', bucket: 'personal' }), 'bucket not allowed', ['personal']);
      denied(await c.call('save_token', { provider: 'anthropic', bucket: 'personal', token: { access_token: 'at-evil' } }), 'bucket not allowed');
      denied(await c.call('remove_token', { provider: 'anthropic', bucket: 'personal' }), 'bucket not allowed');
      denied(await c.call('get_bucket_stats', { provider: 'anthropic', bucket: 'personal' }), 'bucket not allowed');
      denied(await c.call('refresh_token', { provider: 'anthropic', bucket: 'personal' }), 'bucket not allowed');
      await inSync(c);
    });
  });
  await check(S, 'disallowed API key name -> UNAUTHORIZED "API key not allowed" for get_api_key and has_api_key (present or not)', async () => {
    await session(pol, async (c) => {
      denied(await c.call('get_api_key', { name: 'gemini_key' }), 'API key not allowed', ['gemini_key']);
      denied(await c.call('has_api_key', { name: 'gemini_key' }), 'API key not allowed');
      denied(await c.call('has_api_key', { name: 'absentkeyname' }), 'API key not allowed', ['absentkeyname']);
      denied(await c.call('get_api_key', { name: 'absentkeyname' }), 'API key not allowed');
      await inSync(c);
    });
  });
  await check(S, 'a refusal names the kind refused in "denied": provider, bucket, api_key', async () => {
    await session(pol, async (c) => {
      for (const [op, payload, kind] of [
        ['get_token', { provider: 'gemini' }, 'provider'],
        ['list_buckets', { provider: 'gemini' }, 'provider'],
        ['save_token', { provider: 'gemini', token: { access_token: 'at-evil' } }, 'provider'],
        ['get_token', { provider: 'anthropic', bucket: 'personal' }, 'bucket'],
        ['get_api_key', { name: 'gemini_key' }, 'api_key'],
        ['has_api_key', { name: 'gemini_key' }, 'api_key'],
      ]) {
        const j = isFail(await c.call(op, payload), 'UNAUTHORIZED');
        expect(j.denied === kind, `${op} ${JSON.stringify(payload)}: "denied" ${JSON.stringify(j.denied)}, expected ${JSON.stringify(kind)}`);
      }
      await inSync(c);
    });
  });
  await check(S, 'provider, bucket and key names are separate spaces (allowed names used in the wrong role are refused)', async () => {
    await session(pol, async (c) => {
      // key names that equal an allowed provider / bucket
      denied(await c.call('get_api_key', { name: 'anthropic' }), 'API key not allowed');
      denied(await c.call('has_api_key', { name: 'default' }), 'API key not allowed');
      // providers named like an allowed key / bucket
      denied(await c.call('get_token', { provider: 'openai_key' }), 'provider not allowed');
      denied(await c.call('get_token', { provider: 'work' }), 'provider not allowed');
      denied(await c.call('list_buckets', { provider: 'openai_key' }), 'provider not allowed');
      // bucket named like an allowed provider
      denied(await c.call('get_token', { provider: 'anthropic', bucket: 'openai' }), 'bucket not allowed');
    });
  });
  await check(S, 'order of checks: schema before policy (disallowed provider with an unknown member or a bad name -> INVALID_REQUEST)', async () => {
    await session(pol, async (c) => {
      isFail(await c.call('get_token', { provider: 'gemini', extra: 1 }), 'INVALID_REQUEST');
      isFail(await c.call('get_token', { provider: 'gemini/x' }), 'INVALID_REQUEST');
      isFail(await c.call('get_api_key', { name: 'gemini key' }), 'INVALID_REQUEST');
    });
  });
  await check(S, 'order of checks: policy before store (disallowed absent provider/bucket/key -> UNAUTHORIZED, not NOT_FOUND)', async () => {
    await session(pol, async (c) => {
      denied(await c.call('get_token', { provider: 'nosuchprovider' }), 'provider not allowed');
      denied(await c.call('get_token', { provider: 'openai', bucket: 'nosuchbucket' }), 'bucket not allowed');
      denied(await c.call('get_api_key', { name: 'nosuchkey' }), 'API key not allowed');
      denied(await c.call('list_buckets', { provider: 'nosuchprovider' }), 'provider not allowed');
    });
  });
  await check(S, 'refresh_token of an allowed provider -> PROVIDER_NOT_FOUND', async () => {
    await session(pol, async (c) => isFail(await c.call('refresh_token', { provider: 'anthropic' }), 'PROVIDER_NOT_FOUND'));
  });

  // "An absent bucket means "default" everywhere": with only bucket "work"
  // allowed, an absent (or null) bucket is the disallowed bucket "default".
  await check(S, 'with -allow-bucket work only, an absent or null bucket is "default" and refused with "bucket not allowed"', async () => {
    const p2 = await startServer('policy-work-only', { fixture: POLICY_FIXTURE, args: ['-allow-bucket', 'work'] });
    try {
      await session(p2, async (c) => {
        denied(await c.call('get_token', { provider: 'anthropic' }), 'bucket not allowed');
        denied(await c.call('get_token', { provider: 'anthropic', bucket: null }), 'bucket not allowed');
        denied(await c.call('get_bucket_stats', { provider: 'anthropic' }), 'bucket not allowed');
        denied(await c.call('save_token', { provider: 'anthropic', token: { access_token: 'at-x' } }), 'bucket not allowed');
        sameJSON(isOk(await c.call('get_token', { provider: 'anthropic', bucket: 'work' })), { access_token: 'at-pol-a-work' }, 'work');
        sameJSON(isOk(await c.call('list_buckets', { provider: 'anthropic' })), { buckets: ['work'] }, 'list_buckets');
      });
    } finally {
      await stopServer(p2).catch(() => {});
    }
  });
}

// ---------------------------------------------------------------------------
// "Sessions", with what "Roles and transport" and "Handshake" say of them.
// memserver -session serves one session: it prints the socket line, then
// LLXPRT_CAPABILITY_TOKEN=<token>; its -allow-* flags form the session's
// read-only grant (no flag on an axis: nothing on it, but for buckets, where
// none means the "default" bucket only; "*": every name). With -socket-dir
// DIR, the session's directory is DIR/session.
// ---------------------------------------------------------------------------

const HEX64 = /^[0-9a-f]{64}$/;

const sessTok = (s) => {
  OTHER_SECRETS.add(`at-${s}`);
  return `{"access_token":"at-${s}","refresh_token":"${RT(s)}"}`;
};
const SESSION_DEFAULT_TOKEN = `{"access_token":"at-sess-anthropic-default","refresh_token":"${RT('sess-anthropic-default')}","token_type":"Bearer","expiry":1893456000,"price":1.50,"big":12345678901234567890,"nested":{"note":"refresh_token","n":-0.0,"list":[1,{"k":null}]},"none":null}`;
OTHER_SECRETS.add('at-sess-anthropic-default');
const SESSION_KEYS = { anthropic: 'sk-sess-KEYVALUE-1', openai_key: 'sk-sess-KEYVALUE-2' };
for (const v of Object.values(SESSION_KEYS)) OTHER_SECRETS.add(v);
// gemini has a token in the "work" bucket only.
const SESSION_FIXTURE = `{"tokens":{
 "anthropic":{"default":${SESSION_DEFAULT_TOKEN},"work":${sessTok('sess-anthropic-work')},"personal":${sessTok('sess-anthropic-personal')}},
 "openai":{"default":${sessTok('sess-openai-default')}},
 "gemini":{"work":${sessTok('sess-gemini-work')}}
},"keys":${JSON.stringify(SESSION_KEYS)}}`;

/** Lists every file below dir (for "no socket was created"). */
function filesBelow(dir) {
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...filesBelow(p));
    else out.push(p);
  }
  return out;
}

/** Waits for a server expected to refuse to start; kills it if it listens. */
async function expectRefusedStart(srv) {
  try {
    await withTimeout(srv.closed, 6000, 'exit');
  } catch {
    await stopServer(srv).catch(() => {});
    throw new CheckError(`${srv.label}: server did not exit; stdout ${show(srv.stdout)}; stderr ${show(srv.stderr)}`);
  }
  await srv.exited;
  expect(srv.exit.code !== 0 && srv.exit.code !== null, `${srv.label}: exit ${JSON.stringify(srv.exit)}, expected a non-zero status`);
  expect(!srv.stdout.includes('LLXPRT_'), `${srv.label}: printed ${JSON.stringify(srv.stdout)}`);
}

async function sessionChecks(main) {
  const S = 'Sessions';
  const H = 'Sessions/Handshake';
  const TR = 'Sessions/Roles and transport';
  const G = 'Sessions/Grant';
  const F = 'Sessions/Fair share';
  const V = 'Sessions/Revocation';

  let ga, gb, gn, gd;
  try {
    // read-only grant of provider anthropic (so its "default" bucket only), no key
    ga = await startServer('session-anthropic', { fixture: SESSION_FIXTURE, args: ['-session', '-allow-provider', 'anthropic'] });
    // "*" on every axis, at the default path
    gb = await startServer('session-all', { fixture: SESSION_FIXTURE, socketDir: false, args: ['-session', '-allow-provider', '*', '-allow-bucket', '*', '-allow-key', '*'] });
    // nothing granted, at the default path
    gn = await startServer('session-none', { fixture: SESSION_FIXTURE, socketDir: false, args: ['-session'] });
    // every provider, no bucket named (so "default" only), no key
    gd = await startServer('session-anyprov', { fixture: SESSION_FIXTURE, args: ['-session', '-allow-provider', '*'] });
  } catch (e) {
    await check(S, 'start four -session servers', () => {
      throw e;
    });
    return;
  }
  const sessions = [ga, gb, gn, gd];
  for (const s of sessions) OTHER_SECRETS.add(s.token);
  const denied = (f, error, hides = []) => isFail(f, 'UNAUTHORIZED', { error, hides });
  const RO = 'sandbox connections cannot modify tokens';

  // --- memserver -session, "Roles and transport" ---------------------------

  await check('memserver -session', 'stdout is exactly two lines, LLXPRT_CREDENTIAL_SOCKET=<path> then LLXPRT_CAPABILITY_TOKEN=<64 lowercase hex>; every session has a token of its own', async () => {
    for (const s of sessions) {
      expect(HEX64.test(s.token), `${s.label}: token ${JSON.stringify(s.token)} is not 64 lowercase hex characters`);
      expect(s.stdout === `LLXPRT_CREDENTIAL_SOCKET=${s.socketPath}\nLLXPRT_CAPABILITY_TOKEN=${s.token}\n`, `${s.label}: stdout is ${JSON.stringify(s.stdout)}`);
    }
    expect(new Set(sessions.map((s) => s.token)).size === sessions.length, 'two sessions have the same capability token');
  });

  await check(TR, 'a session\'s socket path is absolute; the socket is alone in a directory of its own (mode 0700, the user\'s); the socket has mode 0600', async () => {
    for (const s of sessions) {
      expect(path.isAbsolute(s.socketPath), `${s.label}: ${s.socketPath} is not absolute`);
      const dir = path.dirname(s.socketPath);
      const st = fs.statSync(dir);
      expect(st.isDirectory(), `${s.label}: ${dir} is not a directory`);
      expect((st.mode & 0o777) === 0o700, `${s.label}: directory ${dir} has mode ${(st.mode & 0o777).toString(8)}`);
      expect(st.uid === process.getuid(), `${s.label}: directory ${dir} belongs to uid ${st.uid}`);
      const entries = fs.readdirSync(dir);
      expect(entries.length === 1 && entries[0] === path.basename(s.socketPath), `${s.label}: directory ${dir} holds ${JSON.stringify(entries)}`);
      const ss = fs.lstatSync(s.socketPath);
      expect(ss.isSocket(), `${s.label}: ${s.socketPath} is not a socket`);
      expect((ss.mode & 0o777) === 0o600, `${s.label}: socket mode ${(ss.mode & 0o777).toString(8)}`);
    }
    expect(new Set(sessions.map((s) => path.dirname(s.socketPath))).size === sessions.length, 'two sessions share a directory');
  });

  await check(TR, 'default session socket path is {realpath(tmp)}/llxprt-cred-{uid}/session-{8 hex}/llxprt-cred-{pid}-{8 hex}.sock; the per-user directory has mode 0700', async () => {
    const tmp = fs.realpathSync(process.env.TMPDIR || '/tmp');
    const uid = process.getuid();
    for (const s of [gb, gn]) {
      const re = new RegExp(`^${escapeRe(tmp)}/llxprt-cred-${uid}/session-[0-9a-f]{8}/llxprt-cred-${s.child.pid}-[0-9a-f]{8}\\.sock$`);
      expect(re.test(s.socketPath), `${s.label}: path ${s.socketPath} does not match ${re}`);
      const st = fs.statSync(path.dirname(path.dirname(s.socketPath)));
      expect((st.mode & 0o777) === 0o700 && st.uid === uid, `${s.label}: per-user directory mode ${(st.mode & 0o777).toString(8)}, uid ${st.uid}`);
    }
  });

  await check('memserver -socket-dir', 'with -session -socket-dir DIR, the session\'s directory is DIR/session', async () => {
    for (const s of [ga, gd]) {
      const dir = path.dirname(s.socketPath);
      expect(dir === path.join(s.sockDir, 'session') || dir === path.join(fs.realpathSync(s.sockDir), 'session'), `${s.label}: socket ${s.socketPath} not in ${s.sockDir}/session`);
    }
  });

  await check('Roles and transport', 'a host refuses to start when a directory above its socket is writable by others and not sticky (0777), and starts when it is sticky (1777); plain and -session', async () => {
    const top = fs.mkdtempSync(path.join(os.tmpdir(), 'credproxy-conformance-open-'));
    try {
      const open = path.join(top, 'open');
      fs.mkdirSync(open);
      fs.chmodSync(open, 0o777);
      const sock = path.join(open, 'sock');
      fs.mkdirSync(sock, { mode: 0o700 });
      for (const args of [[], ['-session', '-allow-provider', '*']]) {
        const what = args.length ? 'session' : 'plain';
        const srv = spawnServer(`open-dir-${what}`, { fixture: SMALL_FIXTURE, socketDir: sock, args, dir: top });
        await expectRefusedStart(srv);
        const files = filesBelow(sock);
        expect(files.length === 0, `${what}: files left: ${JSON.stringify(files)}`);
      }
      fs.chmodSync(open, 0o1777);
      for (const args of [[], ['-session', '-allow-provider', '*']]) {
        const what = args.length ? 'session' : 'plain';
        const srv = await startServer(`sticky-dir-${what}`, { fixture: SMALL_FIXTURE, socketDir: sock, args, dir: top });
        try {
          await session(srv, (c) => inSync(c));
        } finally {
          await stopServer(srv).catch(() => {});
        }
      }
    } finally {
      fs.rmSync(top, { recursive: true, force: true });
    }
  });

  // --- "Handshake": the capability token ------------------------------------

  const refusedToken = async (srv, msg, what) => {
    await session(srv, async (c) => {
      await c.send(msg);
      const f = await c.next();
      sameJSON(f.json, HANDSHAKE_UNAUTH, `${srv.label}: reply to ${what}`);
      await c.expectClosedQuietly(3000);
    }, { handshake: false, label: 'bad-token' });
  };
  const acceptedToken = async (srv, msg, what) => {
    await session(srv, async (c) => {
      await c.send(msg);
      const f = await c.next();
      sameJSON(f.json, HANDSHAKE_OK, `${srv.label}: reply to ${what}`);
      await inSync(c);
    }, { handshake: false, label: 'good-token' });
  };
  // A token of the right form that is not the session's.
  const wrongToken = (t) => t.slice(0, 63) + (t[63] === '0' ? '1' : '0');

  await check(H, 'a handshake without capabilityToken gets exactly {"v":1,"op":"handshake","ok":false,"code":"UNAUTHORIZED","error":"invalid or missing capability token"}, then the connection is closed with nothing more', async () => {
    for (const srv of [ga, gb]) {
      await refusedToken(srv, HANDSHAKE, 'the canonical handshake, no token');
      await refusedToken(srv, { v: 1, op: 'handshake' }, 'a handshake without payload');
      await refusedToken(srv, { v: 1, op: 'handshake', payload: null }, 'payload null');
      await refusedToken(srv, { v: 1, op: 'handshake', payload: {} }, 'payload {}');
    }
  });

  await check(H, 'a wrong token (64 lowercase hex) and another session\'s token get UNAUTHORIZED, then close', async () => {
    await refusedToken(ga, tokenHandshake(wrongToken(ga.token)), 'a wrong token');
    await refusedToken(ga, tokenHandshake('0'.repeat(64)), '64 zeros');
    await refusedToken(ga, tokenHandshake(gb.token), 'the token of another session');
    await refusedToken(ga, tokenHandshake(gn.token), 'the token of another session');
    await refusedToken(gb, tokenHandshake(ga.token), 'the token of another session');
  });

  await check(H, 'a malformed token gets UNAUTHORIZED, then close: one character short, one long, upper-case hex, with a trailing newline or space, empty, a number, null, true, an array, an object', async () => {
    const t = ga.token;
    const cases = [
      [t.slice(0, 63), 'the token less its last character'],
      [t + '0', 'the token and one more character'],
      [t.slice(1), 'the token less its first character'],
      [t + '\n', 'the token and a newline'],
      [` ${t}`, 'a space and the token'],
      ['', 'an empty string'],
      [42, 'the number 42'],
      [null, 'null'],
      [true, 'true'],
      [[t], 'an array holding the token'],
      [{ token: t }, 'an object holding the token'],
    ];
    if (t.toUpperCase() !== t) cases.push([t.toUpperCase(), 'the token in upper case']);
    else notes.push('session token has no letter: upper-case case not tested');
    if (/[a-f]/.test(t)) {
      const k = t.search(/[a-f]/);
      cases.push([t.slice(0, k) + t[k].toUpperCase() + t.slice(k + 1), 'the token with one letter in upper case']);
    }
    for (const [v, what] of cases) await refusedToken(ga, tokenHandshake(v), what);
    // a 64-digit number is not a string
    await refusedToken(ga, `{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"capabilityToken":${'1'.repeat(64)}}}`, 'a 64-digit number');
  });

  await check(H, 'the token anywhere but in payload.capabilityToken (envelope member, "CapabilityToken", "capability_token", "token") gets UNAUTHORIZED', async () => {
    const t = ga.token;
    await refusedToken(ga, { ...HANDSHAKE, capabilityToken: t }, 'the token as an envelope member');
    for (const k of ['CapabilityToken', 'capabilitytoken', 'capability_token', 'token']) {
      await refusedToken(ga, { v: 1, op: 'handshake', payload: { minVersion: 1, maxVersion: 1, [k]: t } }, `the token as payload member ${k}`);
    }
  });

  await check(H, 'the session\'s token is accepted with exactly {"v":1,"op":"handshake","ok":true,"data":{"version":1}} (with min/max 1..1, with no min/max and v:1, and v2-style v:2 1..2)', async () => {
    for (const srv of sessions) await acceptedToken(srv, tokenHandshake(srv.token), 'the canonical handshake with the token');
    await acceptedToken(ga, { v: 1, op: 'handshake', payload: { capabilityToken: ga.token } }, 'v:1, the token and no min/max');
    await acceptedToken(ga, tokenHandshake(ga.token, { minVersion: 1, maxVersion: 2 }, 2), 'v:2, 1..2 and the token');
  });

  await check(H, 'the token is a JSON string: written with \\u escapes it is the same token and is accepted', async () => {
    const t = ga.token;
    const esc = (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, '0')}`;
    const text = `{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1,"capabilityToken":"${esc(t[0])}${t.slice(1, 63)}${esc(t[63])}"}}`;
    await acceptedToken(ga, text, 'the token with its first and last characters \\u-escaped');
  });

  await check(H, 'the token is checked before the version: a wrong or missing token with an incompatible version gets UNAUTHORIZED; the right token with one gets UNKNOWN_VERSION', async () => {
    const w = wrongToken(ga.token);
    await refusedToken(ga, tokenHandshake(w, { minVersion: 2, maxVersion: 3 }), 'a wrong token and versions 2..3');
    await refusedToken(ga, tokenHandshake(w, { minVersion: 1 }), 'a wrong token and only minVersion');
    await refusedToken(ga, tokenHandshake(w, { minVersion: '1', maxVersion: 1 }), 'a wrong token and a string minVersion');
    await refusedToken(ga, { v: 2, op: 'handshake', payload: { minVersion: 2, maxVersion: 3 } }, 'no token and versions 2..3');
    await refusedToken(ga, { v: 2, op: 'handshake' }, 'no token, v:2 and no payload');
    await refusedToken(ga, tokenHandshake(42, { minVersion: 0, maxVersion: 0 }), 'token 42 and versions 0..0');
    for (const msg of [tokenHandshake(ga.token, { minVersion: 2, maxVersion: 3 }), { v: 2, op: 'handshake', payload: { capabilityToken: ga.token } }]) {
      await session(ga, async (c) => {
        await c.send(msg);
        sameJSON((await c.next()).json, HANDSHAKE_BAD, 'reply to the right token with an incompatible version');
        await c.expectClosedQuietly(3000);
      }, { handshake: false, label: 'token-bad-version' });
    }
  });

  await check(H, 'requests written in the same write as a refused handshake are never answered; behind an accepted one they are', async () => {
    const reqs = [
      frameBuf({ id: 'behind1', op: 'get_token', payload: { provider: 'anthropic' } }),
      frameBuf({ id: 'behind2', op: 'list_providers' }),
    ];
    for (const [hs, what] of [[HANDSHAKE, 'no token'], [tokenHandshake(wrongToken(ga.token)), 'a wrong token'], [tokenHandshake(gb.token), 'another session\'s token']]) {
      await session(ga, async (c) => {
        await c.write(Buffer.concat([frameBuf(hs), ...reqs]));
        sameJSON((await c.next()).json, HANDSHAKE_UNAUTH, `reply to ${what}`);
        await c.expectClosedQuietly(3000);
      }, { handshake: false, label: 'pipelined-bad' });
    }
    await session(ga, async (c) => {
      await c.write(Buffer.concat([frameBuf(tokenHandshake(ga.token)), ...reqs]));
      sameJSON((await c.next()).json, HANDSHAKE_OK, 'handshake reply');
      expect(isOk(await c.waitId('behind1')).access_token === 'at-sess-anthropic-default', 'behind1');
      sameJSON(isOk(await c.waitId('behind2')), { providers: ['anthropic'] }, 'behind2');
    }, { handshake: false, label: 'pipelined-good' });
  });

  await check(H, 'refused handshakes do not disturb the session: an established connection keeps working and the token still opens new ones', async () => {
    await session(ga, async (est) => {
      for (let k = 0; k < 5; k++) await refusedToken(ga, tokenHandshake(wrongToken(ga.token)), `wrong token #${k + 1}`);
      await inSync(est);
      await acceptedToken(ga, tokenHandshake(ga.token), 'the right token after wrong ones');
    });
  });

  await check(H, 'a first frame that is not a handshake on a session socket -> INVALID_REQUEST "handshake required" echoing the id, then close; nothing is served', async () => {
    await session(ga, async (c) => {
      await c.send({ v: 1, id: 'sess-first', op: 'get_token', payload: { provider: 'anthropic' }, capabilityToken: ga.token });
      const f = await c.next();
      isFail(f, 'INVALID_REQUEST', { id: 'sess-first', error: 'handshake required' });
      await c.expectClosedQuietly(3000);
    }, { handshake: false, label: 'first-not-handshake' });
  });

  await check('Handshake', 'a server without sessions ignores capabilityToken: a session\'s token, a wrong one, "", 42 and null are all accepted', async () => {
    for (const t of [ga.token, wrongToken(ga.token), 'cap-123', '', 42, null]) {
      await acceptedToken(main, tokenHandshake(t), `token ${JSON.stringify(t)}`);
    }
  });

  // --- "Sessions": the grant --------------------------------------------------

  await check(G, '-allow-provider anthropic: get_token anthropic (bucket absent, null or "default") is the stored token without refresh_token, every other byte as stored', async () => {
    await session(ga, async (c) => {
      const want = withoutMember(parseRaw(SESSION_DEFAULT_TOKEN), 'refresh_token');
      for (const payload of [{ provider: 'anthropic' }, { provider: 'anthropic', bucket: null }, { provider: 'anthropic', bucket: 'default' }]) {
        const f = await c.call('get_token', payload);
        isOk(f);
        const d = rawDiff(want, member(f.tree, 'data'));
        expect(!d, `${JSON.stringify(payload)}: ${d}: ${f}`);
        expect(f.text.includes('"price":1.50') && f.text.includes('"n":-0.0'), `numbers not as written: ${f}`);
      }
    });
  });

  await check(G, '-allow-provider anthropic (no bucket named) covers the "default" bucket only: other buckets -> UNAUTHORIZED "bucket not allowed" for get_token, get_bucket_stats, refresh_token', async () => {
    await session(ga, async (c) => {
      for (const b of ['work', 'personal', 'nosuchbucket']) {
        denied(await c.call('get_token', { provider: 'anthropic', bucket: b }), 'bucket not allowed', [b]);
        denied(await c.call('get_bucket_stats', { provider: 'anthropic', bucket: b }), 'bucket not allowed', [b]);
        denied(await c.call('refresh_token', { provider: 'anthropic', bucket: b }), 'bucket not allowed', [b]);
      }
      await inSync(c);
    });
  });

  await check(G, 'a provider outside the grant -> UNAUTHORIZED "provider not allowed" (get_token, get_bucket_stats, refresh_token, list_buckets; present or not)', async () => {
    await session(ga, async (c) => {
      for (const p of ['openai', 'gemini', 'nosuchprovider', 'Anthropic']) {
        denied(await c.call('get_token', { provider: p }), 'provider not allowed', [p]);
        denied(await c.call('get_token', { provider: p, bucket: 'work' }), 'provider not allowed', [p]);
        denied(await c.call('get_bucket_stats', { provider: p }), 'provider not allowed', [p]);
        denied(await c.call('refresh_token', { provider: p }), 'provider not allowed', [p]);
        denied(await c.call('list_buckets', { provider: p }), 'provider not allowed', [p]);
      }
      await inSync(c);
    });
  });

  await check(G, 'granted reads work: get_bucket_stats of anthropic/default; refresh_token of anthropic gets PROVIDER_NOT_FOUND (memserver has no refresher), not UNAUTHORIZED', async () => {
    await session(ga, async (c) => {
      sameJSON(isOk(await c.call('get_bucket_stats', { provider: 'anthropic' })), { bucket: 'default', requestCount: 0, percentage: 0 }, 'stats');
      isFail(await c.call('refresh_token', { provider: 'anthropic' }), 'PROVIDER_NOT_FOUND');
    });
  });

  await check(G, 'no API key granted: get_api_key and has_api_key -> UNAUTHORIZED "API key not allowed" (present or absent names); list_api_keys is {"keys":[]}', async () => {
    await session(ga, async (c) => {
      for (const n of ['anthropic', 'openai_key', 'nosuchkey']) {
        denied(await c.call('get_api_key', { name: n }), 'API key not allowed', [n]);
        denied(await c.call('has_api_key', { name: n }), 'API key not allowed', [n]);
      }
      sameJSON(isOk(await c.call('list_api_keys')), { keys: [] }, 'list_api_keys');
      await inSync(c);
    });
  });

  await check(G, 'read-only: the refusal of a write of a granted token names its kind, "denied":"read_only"', async () => {
    await session(ga, async (c) => {
      for (const [op, payload] of [['save_token', { provider: 'anthropic', token: { access_token: 'at-sandbox-write' } }], ['remove_token', { provider: 'anthropic' }]]) {
        const j = isFail(await c.call(op, payload), 'UNAUTHORIZED', { error: RO });
        expect(j.denied === 'read_only', `${op}: "denied" ${JSON.stringify(j.denied)}, expected "read_only"`);
      }
    });
  });
  await check(G, 'read-only: save_token and remove_token of a granted token -> UNAUTHORIZED "sandbox connections cannot modify tokens"; nothing changes', async () => {
    await session(ga, async (c) => {
      const before = await c.call('get_token', { provider: 'anthropic' });
      isOk(before);
      denied(await c.call('save_token', { provider: 'anthropic', token: { access_token: 'at-sandbox-write' } }), RO);
      denied(await c.call('save_token', { provider: 'anthropic', bucket: 'default', token: { access_token: 'at-sandbox-write', refresh_token: RT('sandbox-write') } }), RO);
      denied(await c.call('save_token', { provider: 'anthropic', bucket: null, token: { access_token: 'at-sandbox-write' } }), RO);
      denied(await c.call('remove_token', { provider: 'anthropic' }), RO);
      denied(await c.call('remove_token', { provider: 'anthropic', bucket: 'default' }), RO);
      // outside the grant too: refused (which of the two messages is not specified)
      for (const [op, payload] of [['save_token', { provider: 'openai', token: { access_token: 'at-sandbox-write' } }], ['remove_token', { provider: 'openai' }], ['save_token', { provider: 'newprovider', token: { access_token: 'at-sandbox-write' } }], ['remove_token', { provider: 'anthropic', bucket: 'work' }]]) {
        isFail(await c.call(op, payload), 'UNAUTHORIZED');
      }
      const after = await c.call('get_token', { provider: 'anthropic' });
      const d = rawDiff(member(before.tree, 'data'), member(after.tree, 'data'));
      expect(!d, `token changed: ${d}`);
      sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic'] }, 'list_providers');
      await inSync(c);
    });
    await session(gb, async (c) => {
      // the same store, seen from the session that may read everything
      sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic', 'gemini', 'openai'] }, 'list_providers (all)');
      isOk(await c.call('get_token', { provider: 'openai' }));
    });
  });

  await check(G, 'schema before policy: a write with a bad payload gets INVALID_REQUEST, not UNAUTHORIZED', async () => {
    await session(ga, async (c) => {
      isFail(await c.call('save_token', { provider: 'anthropic', token: {} }), 'INVALID_REQUEST');
      isFail(await c.call('save_token', { provider: 'anthropic' }), 'INVALID_REQUEST');
      isFail(await c.call('remove_token', { provider: 'anthropic', extra: 1 }), 'INVALID_REQUEST');
      isFail(await c.call('get_api_key', { name: 'bad name' }), 'INVALID_REQUEST');
    });
  });

  await check(G, 'lists answer only what the session may read: list_providers ["anthropic"], list_buckets anthropic ["default"]', async () => {
    await session(ga, async (c) => {
      sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic'] }, 'list_providers');
      sameJSON(isOk(await c.call('list_buckets', { provider: 'anthropic' })), { buckets: ['default'] }, 'list_buckets');
    });
  });

  await check(G, 'a session granted nothing: every read -> UNAUTHORIZED, every list empty', async () => {
    await session(gn, async (c) => {
      sameJSON(isOk(await c.call('list_providers')), { providers: [] }, 'list_providers');
      sameJSON(isOk(await c.call('list_api_keys')), { keys: [] }, 'list_api_keys');
      denied(await c.call('get_token', { provider: 'anthropic' }), 'provider not allowed');
      denied(await c.call('get_bucket_stats', { provider: 'anthropic' }), 'provider not allowed');
      denied(await c.call('refresh_token', { provider: 'anthropic' }), 'provider not allowed');
      denied(await c.call('list_buckets', { provider: 'anthropic' }), 'provider not allowed');
      denied(await c.call('get_api_key', { name: 'anthropic' }), 'API key not allowed');
      denied(await c.call('has_api_key', { name: 'anthropic' }), 'API key not allowed');
      isFail(await c.call('save_token', { provider: 'anthropic', token: { access_token: 'at-sandbox-write' } }), 'UNAUTHORIZED');
      isFail(await c.call('remove_token', { provider: 'anthropic' }), 'UNAUTHORIZED');
      await inSync(c);
    });
  });

  await check(G, '-allow-provider "*" and no bucket: every provider, "default" bucket only; list_providers leaves out a provider whose tokens are all in other buckets', async () => {
    await session(gd, async (c) => {
      sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic', 'openai'] }, 'list_providers');
      sameJSON(isOk(await c.call('list_buckets', { provider: 'anthropic' })), { buckets: ['default'] }, 'list_buckets anthropic');
      sameJSON(isOk(await c.call('list_buckets', { provider: 'gemini' })), { buckets: [] }, 'list_buckets gemini');
      sameJSON(isOk(await c.call('get_token', { provider: 'openai' })), { access_token: 'at-sess-openai-default' }, 'openai');
      isFail(await c.call('get_token', { provider: 'nosuchprovider' }), 'NOT_FOUND');
      denied(await c.call('get_token', { provider: 'gemini', bucket: 'work' }), 'bucket not allowed');
      denied(await c.call('get_token', { provider: 'anthropic', bucket: 'work' }), 'bucket not allowed');
      denied(await c.call('get_api_key', { name: 'anthropic' }), 'API key not allowed');
      sameJSON(isOk(await c.call('list_api_keys')), { keys: [] }, 'list_api_keys');
      denied(await c.call('save_token', { provider: 'openai', token: { access_token: 'at-sandbox-write' } }), RO);
      denied(await c.call('remove_token', { provider: 'openai' }), RO);
    });
  });

  await check(G, '"*" on every axis: every provider, bucket and key is readable and listed, but the session stays read-only', async () => {
    await session(gb, async (c) => {
      sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic', 'gemini', 'openai'] }, 'list_providers');
      sameJSON(isOk(await c.call('list_buckets', { provider: 'anthropic' })), { buckets: ['default', 'personal', 'work'] }, 'list_buckets');
      sameJSON(isOk(await c.call('list_api_keys')), { keys: Object.keys(SESSION_KEYS).sort() }, 'list_api_keys');
      sameJSON(isOk(await c.call('get_token', { provider: 'gemini', bucket: 'work' })), { access_token: 'at-sess-gemini-work' }, 'gemini/work');
      sameJSON(isOk(await c.call('get_token', { provider: 'anthropic', bucket: 'personal' })), { access_token: 'at-sess-anthropic-personal' }, 'anthropic/personal');
      for (const [n, v] of Object.entries(SESSION_KEYS)) sameJSON(isOk(await c.call('get_api_key', { name: n })), { key: v }, n);
      sameJSON(isOk(await c.call('has_api_key', { name: 'nosuchkey' })), { exists: false }, 'has_api_key absent');
      isFail(await c.call('get_token', { provider: 'anthropic', bucket: 'nosuchbucket' }), 'NOT_FOUND');
      denied(await c.call('save_token', { provider: 'gemini', bucket: 'work', token: { access_token: 'at-sandbox-write' } }), RO);
      denied(await c.call('save_token', { provider: 'brandnew', token: { access_token: 'at-sandbox-write' } }), RO);
      denied(await c.call('remove_token', { provider: 'gemini', bucket: 'work' }), RO);
      sameJSON(isOk(await c.call('get_token', { provider: 'gemini', bucket: 'work' })), { access_token: 'at-sess-gemini-work' }, 'gemini/work after');
      sameJSON(isOk(await c.call('list_providers')), { providers: ['anthropic', 'gemini', 'openai'] }, 'list_providers after');
    });
  });

  // --- refresh tokens under other names ("Operations": get_token, save_token)

  await check('Operations', 'save_token drops refresh tokens under other spellings (refreshToken, Refresh-Token, REFRESH_TOKEN, refresh.token, refresh_token inside an object or an array) and get_token never returns them; look-alike names are kept byte-exact', async () => {
    await session(main, async (c) => {
      const v = (s) => RT(`spelling-${s}`);
      const keep = '"refresh_tokens":"keep-1","refresh":"keep-2","token":"keep-3","refresh_token_expiry":1893456000,"x_refresh_token":"keep-4","note":"refreshToken","price":1.50';
      const variants = [
        ['camel', `"refreshToken":"${v('camel')}"`, ''],
        ['kebab', `"Refresh-Token":"${v('kebab')}"`, ''],
        ['upper', `"REFRESH_TOKEN":"${v('upper')}"`, ''],
        ['dotted', `"refresh.token":"${v('dotted')}"`, ''],
        ['nested', `"oauth":{"refresh_token":"${v('nested')}","scope":"s","deeper":{"RefreshToken":"${v('deeper')}","keep":1.50}}`, '"oauth":{"scope":"s","deeper":{"keep":1.50}}'],
        ['inarray', `"list":[{"refresh_token":"${v('inarray')}","k":12345678901234567890},2]`, '"list":[{"k":12345678901234567890},2]'],
      ];
      for (const [name, member_, kept] of variants) {
        const bucket = `sp-${name}`;
        const sent = `{"access_token":"at-spelling-${name}",${member_},${keep}}`;
        const id = `spell-${name}`;
        sameJSON(isOk(await c.callText(`{"v":1,"id":"${id}","op":"save_token","payload":{"provider":"spelling","bucket":"${bucket}","token":${sent}}}`, id), id), {}, `${name}: save data`);
        const f = await c.call('get_token', { provider: 'spelling', bucket });
        isOk(f);
        const want = parseRaw(`{"access_token":"at-spelling-${name}",${kept ? `${kept},` : ''}${keep}}`);
        const d = rawDiff(want, member(f.tree, 'data'));
        expect(!d, `${name}: ${d}: ${f}`);
      }
      // every spelling at once, on a stored token that has a refresh token
      isOk(await c.callText(`{"v":1,"id":"spell-base","op":"save_token","payload":{"provider":"spelling","bucket":"sp-all","token":{"access_token":"at-spelling-base","refresh_token":"${v('base')}"}}}`, 'spell-base'));
      const all = variants.map(([, m]) => m).join(',');
      const f0 = await c.callText(`{"v":1,"id":"spell-all","op":"save_token","payload":{"provider":"spelling","bucket":"sp-all","token":{"access_token":"at-spelling-all","refresh_token":"${v('all')}",${all},${keep}}}}`, 'spell-all');
      sameJSON(isOk(f0, 'spell-all'), {}, 'all: save data');
      const f = await c.call('get_token', { provider: 'spelling', bucket: 'sp-all' });
      isOk(f);
      const want = parseRaw(`{"access_token":"at-spelling-all","oauth":{"scope":"s","deeper":{"keep":1.50}},"list":[{"k":12345678901234567890},2],${keep}}`);
      const d = rawDiff(want, member(f.tree, 'data'));
      expect(!d, `all: ${d}: ${f}`);
    });
  });

  await check('memserver -tokens', 'a tokens file with a refresh token under another name (refreshToken, Refresh-Token, oauth.refresh_token, in an array) is refused: non-zero exit, no socket line, the error names the member and never holds the value (plain and -session)', async () => {
    const variants = [
      ['refreshToken', (x) => `"refreshToken":"${x}"`],
      ['Refresh-Token', (x) => `"Refresh-Token":"${x}"`],
      ['oauth', (x) => `"oauth":{"refresh_token":"${x}","scope":"s"}`],
      ['list', (x) => `"list":[{"x":{"REFRESH.TOKEN":"${x}"}}]`],
    ];
    for (const [name, build] of variants) {
      for (const args of [[], ['-session', '-allow-provider', '*']]) {
        const x = RT(`import-${name}`);
        const fixture = `{"tokens":{"anthropic":{"default":{"access_token":"at-import","refresh_token":"${RT('import-plain')}",${build(x)}}}}}`;
        const srv = spawnServer(`import-${name}${args.length ? '-session' : ''}`, { fixture, args });
        await expectRefusedStart(srv);
        expect(srv.stderr.includes(`"${name}"`), `${srv.label}: error does not name member ${name}: ${show(srv.stderr)}`);
        for (const secret of [x, RT('import-plain')]) {
          expect(!srv.stderr.includes(secret) && !srv.stdout.includes(secret), `${srv.label}: output holds the value ${secret}`);
        }
      }
    }
  });

  // --- "Sessions": fair share ---------------------------------------------------

  await check(F, 'a session takes 32 connections: a 33rd makes it drop the oldest not-yet-handshaken one; with 32 handshaken, a new one is closed at once; the handshaken ones keep working', async () => {
    const conns = [];
    try {
      await sleep(100); // let the session see earlier connections close
      for (let k = 0; k < 32; k++) conns.push(await Conn.open(gn.socketPath, `${gn.label}/limit${k}`));
      await sleep(200);
      const extra = await Conn.open(gn.socketPath, `${gn.label}/limit33`);
      conns.push(extra);
      await extra.handshake(tokenHandshake(gn.token));
      await conns[0].waitClosed(2000);
      expect(conns[0].chunks.length === 0, 'the session wrote to the dropped connection');
      for (const k of [1, 2, 31]) expect(!conns[k].closed, `connection #${k + 1} was closed too`);
      const live = conns.filter((c) => !c.closed);
      expect(live.length === 32, `expected 32 live connections, have ${live.length}`);
      await Promise.all(live.filter((c) => c.nframes === 0).map((c) => c.handshake(tokenHandshake(gn.token))));
      const late = await Conn.open(gn.socketPath, `${gn.label}/late`);
      conns.push(late);
      await late.waitClosed(2000);
      expect(late.chunks.length === 0, 'the session wrote to the refused connection');
      isOk(await live[0].call('list_api_keys'));
      isOk(await live[live.length - 1].call('list_api_keys'));
    } finally {
      for (const c of conns) c.close();
    }
  }, 15000);

  await check(F, 'the session\'s rate budget (120/s) is shared by its connections: 5 connections sending 45 requests each (under their own 60) within a fraction of a second meet RATE_LIMITED with an integer retryAfter >= 1', async () => {
    const conns = [];
    try {
      for (let k = 0; k < 5; k++) {
        const c = await Conn.open(gd.socketPath, `${gd.label}/budget${k}`);
        conns.push(c);
        await c.handshake(tokenHandshake(gd.token));
      }
      const t0 = Date.now();
      const results = await Promise.all(conns.map(async (c, k) => {
        const got = [];
        for (let b = 0; b < 3; b++) {
          const ids = Array.from({ length: BATCH }, (_, j) => `budget-${k}-${b}-${j}`);
          await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'list_providers' }))));
          for (const id of ids) got.push(await c.waitId(id));
        }
        return got;
      }));
      const elapsed = (Date.now() - t0) / 1000;
      const all = results.flat();
      const ok = all.filter((f) => f.json.ok === true).length;
      const limited = all.filter((f) => f.json.code === 'RATE_LIMITED');
      const other = all.filter((f) => f.json.ok !== true && f.json.code !== 'RATE_LIMITED');
      expect(other.length === 0, `unexpected answer: ${other[0]}`);
      expect(elapsed < 0.5, `test too slow to be conclusive: ${all.length} requests took ${elapsed} s`);
      expect(limited.length > 0, `${all.length} requests over 5 connections in ${elapsed} s, none RATE_LIMITED`);
      for (const f of limited) {
        const ra = member(f.tree, 'retryAfter');
        expect(ra && ra.t === 'num' && /^[1-9][0-9]*$/.test(ra.raw), `retryAfter not an integer >= 1: ${f}`);
      }
      notes.push(`session rate budget: ${all.length} requests over 5 connections in ${elapsed.toFixed(3)} s: ${ok} served, ${limited.length} RATE_LIMITED`);
    } finally {
      for (const c of conns) c.close();
    }
  });

  // --- "Sessions": revocation ---------------------------------------------------

  await check(V, 'SIGTERM ends a session: its open connection is closed with nothing more, exit status 0, its socket and its directory are removed, and the path no longer connects', async () => {
    const c = await Conn.open(ga.socketPath, `${ga.label}/sigterm`);
    await c.handshake(tokenHandshake(ga.token));
    isOk(await c.call('list_providers'));
    const dir = path.dirname(ga.socketPath);
    const ex = await stopServer(ga, 'SIGTERM');
    await c.expectClosedQuietly(3000);
    expect(ex.code === 0 && ex.signal === null, `exit ${JSON.stringify(ex)}; stderr: ${show(ga.stderr, 300)}`);
    expect(!fs.existsSync(ga.socketPath), `socket ${ga.socketPath} still exists`);
    expect(!fs.existsSync(dir), `session directory ${dir} still exists`);
    let connected = false;
    try {
      const c2 = await Conn.open(ga.socketPath, `${ga.label}/after`);
      connected = true;
      c2.close();
    } catch {
      /* expected */
    }
    expect(!connected, 'connected to the path of an ended session');
  });

  await check(V, 'SIGTERM on the other sessions (default path included): exit status 0, socket and session-{id} directory removed', async () => {
    for (const s of [gb, gn, gd]) {
      const dir = path.dirname(s.socketPath);
      const ex = await stopServer(s, 'SIGTERM');
      expect(ex.code === 0 && ex.signal === null, `${s.label}: exit ${JSON.stringify(ex)}; stderr: ${show(s.stderr, 300)}`);
      expect(!fs.existsSync(s.socketPath), `${s.label}: socket still exists`);
      expect(!fs.existsSync(dir), `${s.label}: session directory ${dir} still exists`);
    }
  });
}

// ---------------------------------------------------------------------------
// "Requests" step 1: rate limit
// ---------------------------------------------------------------------------

// Batch size used where a check pipelines many requests on a connection that
// has already been used. PROTOCOL.md allows 16 in flight, but a dedicated check
// ("in-flight limit counts only unanswered requests") probes whether 16
// outstanding is really always safe; other checks stay at 15 so that they test
// their own property only.
const BATCH = 15;

async function rateLimitChecks(main, fast) {
  const S = 'Requests/Rate limit';

  // Step 4 (in-flight limit, 16) applies to valid requests written in one
  // burst, so PROTOCOL.md allows RESOURCE_EXHAUSTED among the first 60; the
  // first 16 can never be refused.
  await check(S, '61 requests in one write: none of the first 60 is RATE_LIMITED (each ok, or RESOURCE_EXHAUSTED per step 4; the first 16 ok), the 61st is RATE_LIMITED "rate limit exceeded" with integer retryAfter >= 1; other connections unaffected; accepted again after retryAfter', async () => {
    const other = await Conn.open(main.socketPath, 'main/rate-other');
    try {
      await other.handshake();
      await session(main, async (c) => {
        const ids = Array.from({ length: 61 }, (_, k) => `rl${k + 1}`);
        await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'list_api_keys' }))));
        const got = new Map();
        for (const id of ids) got.set(id, await c.waitId(id));
        const first60 = ids.slice(0, 60).map((id) => got.get(id));
        const wrong = first60.filter((f) => f.json.ok !== true && f.json.code !== 'RESOURCE_EXHAUSTED');
        expect(wrong.length === 0, `${wrong.length} of the first 60 failed otherwise than RESOURCE_EXHAUSTED, e.g. ${wrong[0]}`);
        const early = first60.slice(0, 16).filter((f) => f.json.ok !== true);
        expect(early.length === 0, `one of the first 16 was refused: ${early[0]}`);
        const exhausted = first60.filter((f) => f.json.code === 'RESOURCE_EXHAUSTED').length;
        if (exhausted) notes.push(`61-request burst: ${60 - exhausted} of the first 60 succeeded, ${exhausted} got RESOURCE_EXHAUSTED (in-flight limit, PROTOCOL.md Requests step 4)`);
        const last = got.get('rl61');
        isFail(last, 'RATE_LIMITED', { id: 'rl61', error: 'rate limit exceeded' });
        const ra = member(last.tree, 'retryAfter');
        expect(ra && ra.t === 'num' && /^[1-9][0-9]*$/.test(ra.raw), `retryAfter not an integer >= 1: ${last}`);
        // per connection
        isOk(await other.call('list_api_keys'));
        // accepted again after retryAfter seconds
        await sleep(Number(ra.raw) * 1000 + 100);
        isOk(await c.call('list_api_keys'));
      });
    } finally {
      other.close();
    }
  }, 15000);

  await check(S, '60 requests paced below the in-flight limit (batches of 15) all succeed; a following burst of 5 gets at least one RATE_LIMITED with integer retryAfter >= 1', async () => {
    await session(main, async (c) => {
      const t0 = Date.now();
      for (let sent = 0; sent < 60; sent += BATCH) {
        const ids = Array.from({ length: Math.min(BATCH, 60 - sent) }, (_, k) => `rp${sent + k + 1}`);
        await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'has_api_key', payload: { name: 'anthropic' } }))));
        for (const id of ids) sameJSON(isOk(await c.waitId(id), id), { exists: true }, id);
      }
      const elapsed = Date.now() - t0;
      const ids = ['rx1', 'rx2', 'rx3', 'rx4', 'rx5'];
      await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'has_api_key', payload: { name: 'anthropic' } }))));
      const fs5 = [];
      for (const id of ids) fs5.push(await c.waitId(id));
      const limited = fs5.filter((f) => f.json.code === 'RATE_LIMITED');
      expect(limited.length >= 1, `no RATE_LIMITED among 5 requests sent ${elapsed} ms after the first of 60: ${fs5.join(' ')}`);
      for (const f of limited) {
        const ra = member(f.tree, 'retryAfter');
        expect(ra && ra.t === 'num' && /^[1-9][0-9]*$/.test(ra.raw), `retryAfter not an integer >= 1: ${f}`);
      }
      for (const f of fs5) expect(f.json.ok === true || f.json.code === 'RATE_LIMITED', `${f}`);
    });
  }, 10000);

  await check(S, 'every frame after the handshake counts, valid or not; the rate limit is checked before id/op/payload', async () => {
    await session(main, async (c) => {
      const bad = [
        '{"v":1,"op":"list_providers"}', // missing id
        '{"v":1,"id":"b-op","op":"nope"}', // unknown op
        '{"v":1,"id":"b-pl","op":"get_token","payload":{}}', // schema
        'not json', '[1]',
      ];
      const frames = [];
      for (let k = 0; k < 60; k++) frames.push(frameBuf(bad[k % bad.length].replace(/"b-(op|pl)"/, `"b-$1-${k}"`)));
      frames.push(frameBuf({ id: 'after-valid', op: 'list_api_keys' }));
      frames.push(frameBuf({ id: 'after-unknown-op', op: 'nope' }));
      frames.push(frameBuf('{"v":1,"op":"list_providers"}'));
      await c.write(Buffer.concat(frames));
      const all = [];
      for (let k = 0; k < 63; k++) all.push(await c.next());
      const get = (id) => all.find((f) => f.id === id);
      isFail(get('after-valid') ?? { json: null, toString: () => 'none' }, 'RATE_LIMITED', { id: 'after-valid' });
      isFail(get('after-unknown-op') ?? { json: null, toString: () => 'none' }, 'RATE_LIMITED', { id: 'after-unknown-op' });
      const limited = all.filter((f) => f.json?.code === 'RATE_LIMITED').length;
      const invalid = all.filter((f) => f.json?.code === 'INVALID_REQUEST').length;
      expect(limited === 3 && invalid === 60, `expected 60 INVALID_REQUEST + 3 RATE_LIMITED, got ${invalid} + ${limited}`);
    });
  }, 10000);

  await check(S, '-rate 0: 200 requests on one connection (batches of 15 in flight) all succeed', async () => {
    await session(fast, async (c) => {
      let sent = 0;
      while (sent < 200) {
        const n = Math.min(BATCH, 200 - sent);
        const ids = Array.from({ length: n }, (_, k) => `r0-${sent + k}`);
        await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'has_api_key', payload: { name: 'anthropic' } }))));
        for (const id of ids) sameJSON(isOk(await c.waitId(id)), { exists: true }, id);
        sent += n;
      }
    });
  }, 15000);
}

// ---------------------------------------------------------------------------
// "Responses": pipelining and matching by id
// ---------------------------------------------------------------------------

async function pipeliningChecks(fast) {
  const S = 'Responses/pipelining';

  await check(S, '16 different requests in one write are all answered once, each matched to its request by id', async () => {
    await session(fast, async (c) => {
      const reqs = [
        ['get_token', { provider: 'anthropic', bucket: 'work' }, (d) => d.access_token === 'at-anthropic-work-A2'],
        ['get_token', { provider: 'openai' }, (d) => d.access_token === 'at-openai-O1'],
        ['get_token', { provider: 'qwen' }, (d) => d.access_token === 'at-qwen-Q1'],
        ['get_token', { provider: 'minimal' }, (d) => d.access_token === 'at-minimal-M1'],
        ['get_api_key', { name: 'anthropic' }, (d) => d.key === KEYS.anthropic],
        ['get_api_key', { name: 'xai-key' }, (d) => d.key === KEYS['xai-key']],
        ['get_api_key', { name: 'gemini.key@1' }, (d) => d.key === KEYS['gemini.key@1']],
        ['has_api_key', { name: 'openai_api_key' }, (d) => d.exists === true],
        ['has_api_key', { name: 'nokey' }, (d) => d.exists === false],
        ['list_buckets', { provider: 'anthropic' }, (d) => Array.isArray(d.buckets) && d.buckets.includes('work')],
        ['list_api_keys', undefined, (d) => Array.isArray(d.keys) && d.keys.length === 4],
        ['get_bucket_stats', { provider: 'anthropic', bucket: 'alpha' }, (d) => d.bucket === 'alpha'],
        ['get_token', { provider: 'nosuch' }, null, 'NOT_FOUND'],
        ['refresh_token', { provider: 'openai' }, null, 'PROVIDER_NOT_FOUND'],
        ['bogus_op', {}, null, 'INVALID_REQUEST'],
        ['get_token', { provider: 'a b' }, null, 'INVALID_REQUEST'],
      ];
      const ids = reqs.map((_, k) => `p${k}-${newId('x')}`);
      await c.write(Buffer.concat(reqs.map(([op, payload], k) => frameBuf(payload === undefined ? { id: ids[k], op } : { id: ids[k], op, payload }))));
      for (let k = 0; k < reqs.length; k++) {
        const [op, payload, pred, code] = reqs[k];
        const f = await c.waitId(ids[k]);
        if (code) isFail(f, code, { id: ids[k] });
        else expect(pred(isOk(f, ids[k])), `${op} ${JSON.stringify(payload)} answered with ${f}`);
      }
      await c.expectSilent(150);
    });
  });

  await check('Requests/In-flight limit', '40 valid requests in one write (-rate 0): all answered; the first 16 succeed; the others succeed or get RESOURCE_EXHAUSTED; connection stays in sync', async () => {
    await session(fast, async (c) => {
      const ids = Array.from({ length: 40 }, (_, k) => `if${k + 1}`);
      await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'get_api_key', payload: { name: 'anthropic' } }))));
      const got = [];
      for (const id of ids) got.push(await c.waitId(id));
      got.forEach((f, k) => {
        if (k < 16) sameJSON(isOk(f), { key: KEYS.anthropic }, ids[k]);
        else expect(f.json.ok === true || f.json.code === 'RESOURCE_EXHAUSTED', `${ids[k]}: ${f}`);
      });
      const n = got.filter((f) => f.json.code === 'RESOURCE_EXHAUSTED').length;
      notes.push(`40-request burst with -rate 0: ${n} RESOURCE_EXHAUSTED (error text ${JSON.stringify(got.find((f) => f.json.code === 'RESOURCE_EXHAUSTED')?.json.error ?? null)})`);
      await inSync(c);
    });
  });

  await check('Requests/In-flight limit', 'the in-flight limit counts only unanswered requests: a client that sends 16, waits for all 16 answers, and repeats (2000 rounds) is never refused', async () => {
    await session(fast, async (c) => {
      const refused = [];
      for (let round = 0; round < 2000; round++) {
        const ids = Array.from({ length: 16 }, (_, k) => `st-${round}-${k}`);
        await c.write(Buffer.concat(ids.map((id) => frameBuf({ id, op: 'has_api_key', payload: { name: 'anthropic' } }))));
        for (const id of ids) {
          const f = await c.waitId(id);
          if (f.json.ok !== true) refused.push(`round ${round}: ${f}`);
        }
      }
      expect(refused.length === 0, `${refused.length} of 32000 requests refused although at most 16 were unanswered, e.g. ${refused.slice(0, 2).join(' ; ')}`);
    });
  }, 30000);

  await check('Operations', 'saves of the same provider and bucket are serialised: 15 pipelined overlays each adding a member all survive (5 rounds)', async () => {
    await session(fast, async (c) => {
      for (let round = 0; round < 5; round++) {
        const prov = `serial${round}`;
        isOk(await c.call('save_token', { provider: prov, token: { access_token: 'at-serial-0' } }));
        const ids = Array.from({ length: BATCH }, (_, k) => `ser-${round}-${k}`);
        await c.write(Buffer.concat(ids.map((id, k) => frameBuf({ id, op: 'save_token', payload: { provider: prov, token: { access_token: `at-serial-${k}`, [`m${k}`]: k } } }))));
        for (const id of ids) sameJSON(isOk(await c.waitId(id), id), {}, id);
        const d = isOk(await c.call('get_token', { provider: prov }));
        const missing = ids.map((_, k) => `m${k}`).filter((m) => !(m in d));
        expect(missing.length === 0, `round ${round}: members lost: ${missing.join(',')} in ${JSON.stringify(d)}`);
        expect(/^at-serial-\d+$/.test(d.access_token), JSON.stringify(d));
      }
    });
  });

  await check(S, '10 rounds of 15 pipelined get_token requests for different buckets: every answer matches its request', async () => {
    await session(fast, async (c) => {
      isOk(await c.call('save_token', { provider: 'pipe', bucket: 'b0', token: { access_token: 'at-pipe-b0' } }));
      for (let k = 1; k < 16; k++) isOk(await c.call('save_token', { provider: 'pipe', bucket: `b${k}`, token: { access_token: `at-pipe-b${k}` } }));
      for (let round = 0; round < 10; round++) {
        const ids = Array.from({ length: BATCH }, (_, k) => `pipe-${round}-${k}`);
        await c.write(Buffer.concat(ids.map((id, k) => frameBuf({ id, op: 'get_token', payload: { provider: 'pipe', bucket: `b${(k + round) % 16}` } }))));
        for (let k = 0; k < BATCH; k++) {
          const d = isOk(await c.waitId(ids[k]), ids[k]);
          expect(d.access_token === `at-pipe-b${(k + round) % 16}`, `round ${round} #${k}: ${JSON.stringify(d)}`);
        }
      }
      await c.expectSilent(100);
    });
  }, 15000);
}

// ---------------------------------------------------------------------------
// "Connections"
// ---------------------------------------------------------------------------

async function connectionChecks() {
  const S = 'Connections';
  let srv = null;
  try {
    srv = await startServer('connlimit', { fixture: SMALL_FIXTURE, args: ['-rate', '0'] });
  } catch (e) {
    await check(S, 'start a server for the connection-limit checks', () => {
      throw e;
    });
    return;
  }
  const conns = [];
  try {
    await check(S, 'at 256 connections a new one makes the server drop the oldest not-yet-handshaken connection', async () => {
      for (let k = 0; k < 256; k++) conns.push(await Conn.open(srv.socketPath, `connlimit/${k}`));
      await sleep(200); // let the server accept them all
      const extra = await Conn.open(srv.socketPath, 'connlimit/257');
      conns.push(extra);
      await extra.handshake();
      await conns[0].waitClosed(2000);
      expect(conns[0].chunks.length === 0, 'server wrote to the dropped connection');
      for (const k of [1, 2, 255]) expect(!conns[k].closed, `connection #${k + 1} was closed too`);
    }, 15000);

    await check(S, 'when all 256 connections are handshaken, a new connection is closed at once', async () => {
      const live = conns.filter((c) => !c.closed);
      expect(live.length === 256, `expected 256 live connections, have ${live.length}`);
      await Promise.all(live.filter((c) => c.nframes === 0).map((c) => c.handshake()));
      const late = await Conn.open(srv.socketPath, 'connlimit/late');
      conns.push(late);
      await late.waitClosed(2000);
      expect(late.chunks.length === 0, 'server wrote to the refused connection');
      // and the established ones still work
      isOk(await live[live.length - 1].call('list_api_keys'));
      isOk(await live[0].call('list_api_keys'));
    }, 15000);
  } finally {
    for (const c of conns) c.close();
    await stopServer(srv).catch(() => {});
  }
}

// ---------------------------------------------------------------------------
// Shutdown ("Connections": a server that shuts down ... removes its socket)
// ---------------------------------------------------------------------------

async function shutdownChecks(main, fast, policy) {
  const S = 'Connections/shutdown';
  await check(S, 'SIGINT: open connection closed, socket file removed, exit status 0, stdout only the socket line', async () => {
    const c = await Conn.open(main.socketPath, 'main/sigint');
    await c.handshake();
    isOk(await c.call('list_api_keys'));
    const ex = await stopServer(main, 'SIGINT');
    await c.expectClosedQuietly(3000);
    expect(ex.code === 0 && ex.signal === null, `exit ${JSON.stringify(ex)}; stderr: ${show(main.stderr, 300)}`);
    expect(!fs.existsSync(main.socketPath), `socket ${main.socketPath} still exists`);
    expect(main.stdout === `LLXPRT_CREDENTIAL_SOCKET=${main.socketPath}\n`, `stdout is ${JSON.stringify(main.stdout)}`);
  });
  await check(S, 'SIGTERM on idle servers: exit 0 and socket removed (rate-0 and policy servers)', async () => {
    for (const srv of [fast, policy]) {
      const ex = await stopServer(srv, 'SIGTERM');
      expect(ex.code === 0 && ex.signal === null, `${srv.label}: exit ${JSON.stringify(ex)}; stderr: ${show(srv.stderr, 300)}`);
      expect(!fs.existsSync(srv.socketPath), `${srv.label}: socket still exists`);
    }
  });
}

// ---------------------------------------------------------------------------
// Whole-run observations ("Responses", "Roles and transport")
// ---------------------------------------------------------------------------

async function globalChecks() {
  const S = 'whole run';
  const list = (a) => `${a.length} violation(s): ${a.slice(0, 4).join(' || ')}`;
  await check(`${S}: Roles and transport`, 'no refresh token from the fixtures or from save_token requests appears in any byte the server sent', async () => {
    const hits = [];
    for (const c of allConns) {
      const all = Buffer.concat(c.chunks).toString('latin1');
      for (const s of SECRETS) if (all.includes(s)) hits.push(`${c.label}: ${s}`);
    }
    expect(hits.length === 0, list(hits));
    expect(frameCount > 500, `test bug: only ${frameCount} frames observed`);
  });
  await check(`${S}: Frames`, 'every frame the server sent has a length of 1..65536 and is UTF-8 JSON', async () => {
    expect(violations.frame.length === 0, list(violations.frame));
  });
  await check(`${S}: Responses`, 'every response has a string id, boolean ok, object data or a listed code with an error text, no "v", no duplicate members', async () => {
    expect(violations.format.length === 0, list(violations.format));
  });
  await check(`${S}: Responses`, 'the server never sent a frame that does not answer a request (no unknown or repeated ids)', async () => {
    expect(violations.unsolicited.length === 0, list(violations.unsolicited));
  });
  await check(`${S}: Responses`, 'no error message contains a secret (refresh/access token or API key value)', async () => {
    expect(violations.errorSecret.length === 0, list(violations.errorSecret));
  });
}

main().catch(async (e) => {
  console.log(`not ok ${num + 1} - checker crashed: ${oneLine(e.stack || e)}`);
  failed++;
  await cleanup();
  console.log(`conformance: ${passed} passed, ${failed} failed`);
  process.exit(1);
});
