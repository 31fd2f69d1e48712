// The browser demo page (index.html): logs in, follows a topic with RevenProx.follow() in one of
// three modes, answers challenges (or not) and shows what happens. State for tests:
// window.revenproxDemo.
'use strict';

const $ = (id) => document.getElementById(id);
const demo = window.revenproxDemo = {
  settings: null, user: null, token: null, sid: null, sub: null, state: 'idle', mode: null, metrics: null,
  counts: { events: 0, heartbeats: 0, challenges: 0, answered: 0, refusedAnswers: 0, expired: 0, tokens: 0 },
  firstExpiresAt: null, expiresAt: null, openedAt: null, lastEventAt: null, log: [],
};

function jwtExp(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(payload)).exp;
  } catch (_) { return null; }
}

function clock(sec) { return new Date(sec * 1000).toLocaleTimeString([], { hour12: false }); }

function log(kind, text) {
  const t = new Date().toLocaleTimeString([], { hour12: false });
  demo.log.push({ kind, text, t: Date.now() });
  const li = document.createElement('li');
  li.className = kind;
  li.textContent = `${t}  ${text}`;
  const ol = $('log');
  ol.appendChild(li);
  while (ol.children.length > 400) ol.removeChild(ol.firstChild);
  ol.scrollTop = ol.scrollHeight;
}

function render() {
  const c = demo.counts;
  for (const k of ['events', 'heartbeats', 'challenges', 'answered', 'expired']) $(`n-${k}`).textContent = c[k];
  if (demo.mode && demo.mode !== 'fetch') $('n-heartbeats').textContent = '—';
  $('n-heartbeats').parentElement.title = demo.mode && demo.mode !== 'fetch'
    ? 'EventSource does not expose comment lines: heartbeats keep the connection alive unseen' : '';
  const chip = $('state');
  chip.textContent = demo.state;
  chip.className = `chip ${demo.state}`;
  const now = Date.now() / 1000;
  const live = demo.sub && ['open', 'connecting', 'reconnecting'].includes(demo.state);
  if (demo.expiresAt && live) {
    const left = Math.max(0, demo.expiresAt - now);
    const ttl = demo.settings ? demo.settings.token_ttl_sec : 30;
    const before = demo.settings ? demo.settings.challenge_before_expiry_sec : 0;
    $('expiry').textContent = `token expires at ${clock(demo.expiresAt)} (in ${left.toFixed(0)} s); ` +
      `challenge ${before} s before`;
    $('bar').style.width = `${Math.min(100, (left / ttl) * 100)}%`;
    $('bar').style.background = left <= before ? 'var(--warn)' : 'var(--ok)';
    const mark = $('mark');
    mark.style.display = before > 0 && before < ttl ? 'block' : 'none';
    mark.style.left = `${(before / ttl) * 100}%`;
  } else if (!live) {
    $('bar').style.width = '0';
    if (demo.state === 'expired') $('expiry').textContent = 'stream ended with event: expired';
    else if (!demo.sub) $('expiry').textContent = 'no stream';
  }
  $('connect').disabled = !!demo.sub;
  $('disconnect').disabled = !demo.sub;
}
setInterval(render, 250);

// A login starts a session (sid): every token minted for it later carries the same sid, so the
// demo webhook treats them as one session (e2e/servers/webhook.py: DemoSessions).
async function mintToken(newSession) {
  const user = $('user').value;
  if (newSession || !demo.sid || demo.user !== user) demo.sid = `page-${Math.random().toString(36).slice(2, 12)}`;
  const res = await fetch('/demo/token', {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user, sid: demo.sid }), cache: 'no-store',
  });
  if (!res.ok) throw new Error(`POST /demo/token -> ${res.status}`);
  const body = await res.json();
  demo.counts.tokens++;
  return body;
}

async function login() {
  const t = await mintToken(true);
  demo.user = t.user;
  demo.token = t.token;
  $('who').textContent = `logged in as ${t.user}: token valid until ${clock(t.expires_at)} (${t.ttl_sec} s)`;
  log('info', `logged in as ${t.user} (token ${t.token.slice(0, 16)}…, expires ${clock(t.expires_at)})`);
  return t.token;
}

// The page's token source for RevenProx.follow: the login token for the first connection if it is
// still fresh, a newly minted one for every challenge and reconnection (a refresh, in real life).
async function getToken(why) {
  const fresh = demo.token && demo.user === $('user').value &&
    jwtExp(demo.token) - Date.now() / 1000 > (demo.settings ? demo.settings.token_ttl_sec / 2 : 10);
  if (why === 'connect' && fresh) return demo.token;
  const t = await mintToken();
  demo.user = t.user;
  demo.token = t.token;
  $('who').textContent = `logged in as ${t.user}: current token valid until ${clock(t.expires_at)} (${t.ttl_sec} s)`;
  log('info', `${why === 'connect' ? 'new' : 'refreshed'} token for ${why} (expires ${clock(t.expires_at)})`);
  return t.token;
}

function connect() {
  if (demo.sub) return;
  const mode = document.querySelector('input[name=mode]:checked').value;
  const topic = $('topic').value;
  const every = $('pace').value;
  const url = `/events/${encodeURIComponent(topic)}?every=${encodeURIComponent(every)}`;
  Object.assign(demo.counts, { events: 0, heartbeats: 0, challenges: 0, answered: 0, refusedAnswers: 0, expired: 0 });
  Object.assign(demo, { mode, state: 'connecting', firstExpiresAt: null, expiresAt: null, openedAt: null });
  log('info', `--> GET ${url} as ${$('user').value}, mode ${mode}`);
  demo.sub = RevenProx.follow(url, {
    mode,
    getToken: async (why) => {
      const token = await getToken(why);
      if (why !== 'challenge') {
        demo.expiresAt = jwtExp(token);
        if (demo.firstExpiresAt === null) demo.firstExpiresAt = demo.expiresAt;
      }
      return token;
    },
    answerChallenges: () => !$('no-answer').checked,
    onStatus: (state, detail) => {
      demo.state = state;
      $('detail').textContent = detail || '';
      if (state === 'open') { demo.openedAt = demo.openedAt || Date.now(); log('info', `<-- 200 stream open (${detail})`); }
      else if (state === 'error') log('error', `!! ${detail}`);
      else if (state === 'reconnecting') log('info', `.. reconnecting: ${detail}`);
      if (['error', 'expired', 'closed'].includes(state)) demo.sub = null;
      render();
    },
    onEvent: (type, data) => {
      demo.counts.events++;
      demo.lastEventAt = Date.now();
      log('event', `${type}: ${data}`);
    },
    onHeartbeat: () => { demo.counts.heartbeats++; log('heartbeat', ': heartbeat'); },
    onChallenge: () => {
      demo.counts.challenges++;
      log('challenge', `event: challenge${$('no-answer').checked ? ' (not answering)' : ' -> answering with a fresh token'}`);
    },
    onReauthorized: (status, error) => {
      if (status === 204) {
        demo.counts.answered++;
        demo.expiresAt = jwtExp(demo.sub ? demo.sub.token : demo.token) || demo.expiresAt;
        log('reauth', `<-- 204 re-authorized: the stream now lasts until ${clock(demo.expiresAt)}`);
      } else {
        demo.counts.refusedAnswers++;
        log('error', `<-- ${status} ${error || ''}: challenge answer refused`);
      }
      render();
    },
    onExpired: (info) => {
      demo.counts.expired++;
      log('expired', `event: expired ${JSON.stringify(info)} (the filter ended the stream)`);
    },
  });
  render();
}

// The filter's counters (GET /demo/metrics: the demo app reads them from Envoy's admin).
const SHOWN = ['requests', 'allowed', 'denied_invalid_token', 'denied_missing_token', 'webhook_calls', 'cache_hits',
  'open_streams', 'heartbeats_sent', 'challenges_sent', 'reauthorizations', 'streams_expired'];
async function pollMetrics() {
  try {
    const res = await fetch('/demo/metrics', { cache: 'no-store' });
    if (!res.ok) throw new Error(`GET /demo/metrics -> ${res.status}`);
    const m = demo.metrics = await res.json();
    $('metrics-body').innerHTML = '';
    for (const k of SHOWN) {
      const tr = document.createElement('tr');
      tr.innerHTML = '<td></td><td class="n"></td>';
      tr.children[0].textContent = `revenprox_${k}`;
      tr.children[1].textContent = m[`revenprox_${k}`] ?? '—';
      $('metrics-body').appendChild(tr);
    }
  } catch (e) {
    $('metrics-body').innerHTML = '';
    const tr = document.createElement('tr');
    tr.innerHTML = '<td></td>';
    tr.children[0].textContent = `counters unavailable: ${e.message}`;
    $('metrics-body').appendChild(tr);
  }
}

function disconnect() {
  if (demo.sub) demo.sub.close();
  demo.sub = null;
  log('info', 'disconnected');
  render();
}

async function init() {
  $('login').onclick = () => login().catch((e) => log('error', String(e)));
  $('connect').onclick = connect;
  $('disconnect').onclick = disconnect;
  $('clear').onclick = () => { $('log').innerHTML = ''; };
  try {
    const s = demo.settings = await (await fetch('/demo/settings', { cache: 'no-store' })).json();
    const quiet = Math.max(3, s.heartbeat_interval_sec * 2.5);
    $('pace').innerHTML = '';
    for (const [v, text] of [[s.event_interval_sec, `an event every ${s.event_interval_sec} s`],
                             [3, 'an event every 3 s'],
                             [quiet, `quiet: an event every ${quiet} s (heartbeats between)`]]) {
      const opt = document.createElement('option');
      opt.value = v; opt.textContent = text;
      $('pace').appendChild(opt);
    }
    $('settings').innerHTML = `Demo settings: heartbeat after <b>${s.heartbeat_interval_sec} s</b> of silence, ` +
      `challenge <b>${s.challenge_before_expiry_sec} s</b> before expiry, page tokens live <b>${s.token_ttl_sec} s</b>. ` +
      'Client helper: <a href="revenprox-client.js">revenprox-client.js</a>.';
    const link = $('metrics-link');
    link.href = `${location.protocol}//${location.hostname}:${s.admin_port}${s.metrics_path}`;
    link.textContent = link.href;
  } catch (e) {
    $('settings').textContent = `could not load /demo/settings: ${e}`;
  }
  render();
  pollMetrics();
  setInterval(pollMetrics, 2000);
}
init();
