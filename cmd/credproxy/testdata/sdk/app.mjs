// The sandboxed program of TestInjectWithOfficialSDKsInBubblewrap: the
// official Anthropic and OpenAI SDKs, unmodified and configured by the
// environment alone (ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY,
// OPENAI_BASE_URL and OPENAI_API_KEY, as credproxy run -inject sets them),
// and plain fetch for a route that injects an OAuth token (ACME_BASE_URL
// and ACME_TOKEN). Each line it prints is "name: value".
import Anthropic from '@anthropic-ai/sdk';
import OpenAI from 'openai';
import { readFileSync } from 'node:fs';

const out = (name, value) => console.log(`${name}: ${value}`);
const acme = async (path) => {
  const r = await fetch(process.env.ACME_BASE_URL + path, {
    headers: { Authorization: `Bearer ${process.env.ACME_TOKEN}` },
  });
  return `${r.status} ${await r.text()}`;
};

// A streamed message. The upstream sends each text delta only after the
// one before has reached this loop and been acknowledged through the acme
// route: a relay that held events back would stall here.
const anthropic = new Anthropic();
const stream = await anthropic.messages.create({
  model: 'claude-fake',
  max_tokens: 64,
  stream: true,
  messages: [{ role: 'user', content: 'Say hello' }],
});
const types = [];
let text = '';
let n = 0;
for await (const event of stream) {
  types.push(event.type);
  if (event.type === 'content_block_delta') {
    text += event.delta.text;
    out(`ack ${n}`, await acme(`/ack?n=${n}`));
    n++;
  }
}
out('anthropic events', types.join(','));
out('anthropic text', text);

const openai = new OpenAI();
const chat = await openai.chat.completions.create({
  model: 'gpt-fake',
  messages: [{ role: 'user', content: 'Say hi' }],
});
out('openai reply', chat.choices[0].message.content);

// The acme token comes due for refresh on the host at CP_TEST_ACME_DUE_MS.
const due = Number(process.env.CP_TEST_ACME_DUE_MS);
await new Promise((resolve) => setTimeout(resolve, Math.max(0, due - Date.now())));
out('acme after expiry', await acme('/whoami'));

out('environ', readFileSync('/proc/self/environ', 'utf8').split('\0').filter(Boolean).join(' '));
// The test scans this sandbox's processes and files now, then closes stdin.
out('ready', process.pid);
for await (const _ of process.stdin);
out('done', 'ok');
