// The Node recipe of docs/clients.md (the part between the `recipe` lines is copied into the doc
// verbatim; e2e/test_clients.py checks that), and the driver e2e/test_clients.py runs it with:
//
//   node follow.mjs recipe URL TOKEN_URL REFRESHES   the recipe: header via a custom fetch, answers
//                                                    REFRESHES challenges, closes at `expired`
//   node follow.mjs plain  URL TOKEN_URL             a bare EventSource with ?token= that does not
//                                                    close at `expired`: what happens then
//
// Every GET of TOKEN_URL returns a fresh token. One JSON line per thing seen goes to stdout.
// eventsource@4.1.1 comes from .build/clients-node (make client-deps); the test runs a copy there.

// recipe:start
import { EventSource } from 'eventsource';

// getToken(): your refresh call. Each call must return a NEW token (a later exp), or null when
// the session is over: then the challenge goes unanswered and the stream expires.
export async function follow(url, { getToken, onEvent, onExpired }) {
  let token = await getToken();
  const es = new EventSource(url, {
    // eventsource 4 opens (and reopens) the stream with this fetch: the header carries the token
    fetch: (input, init) =>
      fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token}` } }),
  });
  es.addEventListener('message', (e) => onEvent(e.data, e.lastEventId)); // never a `: heartbeat`
  es.addEventListener('challenge', async () => {
    const fresh = await getToken();
    if (!fresh) return;
    token = fresh;
    const res = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/x-challenge-response', Authorization: `Bearer ${token}` },
    });
    if (res.status !== 204) console.error(`challenge answer refused: ${res.status} ${await res.text()}`);
  });
  es.addEventListener('expired', (e) => {
    es.close(); // or EventSource reconnects 3 s after the reset, with this token: 401
    onExpired(JSON.parse(e.data).reason); // 'token_expired' | 'max_duration'
  });
  return es;
}
// recipe:end

const t0 = Date.now();
const out = (kind, extra = {}) =>
  process.stdout.write(`${JSON.stringify({ t: (Date.now() - t0) / 1000, at: Date.now() / 1000, kind, ...extra })}\n`);
const [mode, url, tokenUrl, refreshes = '0'] = process.argv.slice(2);
let tokens = 0;
const mint = async () => (await fetch(tokenUrl)).text();
setTimeout(() => { out('timeout'); process.exit(3); }, 40_000).unref();

if (mode === 'recipe') {
  const getToken = async () => (tokens++ <= Number(refreshes) ? mint() : null);
  const es = await follow(url, {
    getToken,
    onEvent: (data, id) => out('message', { data, id }),
    onExpired: (reason) => out('expired', { reason }),
  });
  es.addEventListener('open', () => out('open'));
  es.addEventListener('challenge', () => out('challenge'));
  es.addEventListener('error', (e) => out('error', { message: e.message, code: e.code, readyState: es.readyState }));
} else if (mode === 'plain') {
  const es = new EventSource(`${url}?token=${encodeURIComponent(await mint())}`);
  es.addEventListener('open', () => out('open'));
  es.addEventListener('message', (e) => out('message', { data: e.data, id: e.lastEventId }));
  es.addEventListener('challenge', () => out('challenge'));
  es.addEventListener('expired', (e) => out('expired', { reason: JSON.parse(e.data).reason }));
  es.addEventListener('error', (e) => {
    out('error', { message: e.message, code: e.code, readyState: es.readyState });
    if (es.readyState === es.CLOSED) process.exit(0); // a failed connection: EventSource gives up
  });
} else {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
