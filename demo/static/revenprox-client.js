/*
 * revenprox-client.js - follow a RevenProx-guarded SSE topic from a browser and answer its
 * challenges. Plain JavaScript, no dependencies; defines `RevenProx` (a global, or
 * module.exports under CommonJS). Documented in docs/browser.md.
 *
 *   const sub = RevenProx.follow('/events/news', {
 *     mode: 'fetch',                       // 'fetch'  : fetch() stream, Authorization header
 *                                          // 'query'  : native EventSource, ?token=<jwt>
 *                                          // 'cookie' : native EventSource, revenprox_token cookie
 *     getToken: async (why) => myToken(),  // why: 'connect' | 'challenge' | 'reconnect'
 *     onEvent: (type, data, id) => {},     // upstream events
 *     onChallenge: (info) => {},           // an `event: challenge` arrived (before it is answered)
 *     onReauthorized: (status, detail) => {}, // the challenge POST was answered (204 = accepted)
 *     onHeartbeat: () => {},               // ': heartbeat' (fetch mode only: EventSource hides comments)
 *     onExpired: (data) => {},             // `event: expired`: the stream is over, no reconnect
 *     onStatus: (state, detail) => {},     // 'connecting' 'open' 'reconnecting' 'closed' 'error' 'expired'
 *     answerChallenges: true,              // or a function () => boolean, asked at each challenge
 *     reconnectOnMismatch: true,           // answer refused with 403 (it reached another Envoy
 *                                          // replica): reopen the stream with the fresh token
 *   });
 *   sub.close();
 *
 * The challenge answer is what the filter expects: POST to the same topic URL (without the token
 * parameter), `content-type: application/x-challenge-response` (taken from the challenge's data),
 * the refreshed token in `Authorization: Bearer`; the filter answers 204 itself and the open
 * stream takes the new token's expiry. In 'cookie' mode the cookie is updated as well, and in
 * 'query' mode the refreshed token is used for any reconnection, so a reconnect never presents a
 * stale token.
 */
(function (root, factory) {
  const api = factory();
  if (typeof module === 'object' && module.exports) module.exports = api;
  else root.RevenProx = api;
})(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  const CHALLENGE_CONTENT_TYPE = 'application/x-challenge-response';
  const noop = () => {};

  /** Parse an SSE byte stream incrementally (WHATWG rules: LF, CR or CRLF line ends). */
  class SseParser {
    constructor(dispatch, comment) {
      this.dispatch = dispatch; // (type, data, id)
      this.comment = comment;   // (text)
      this.buf = '';
      this.data = [];
      this.type = '';
      this.id = null;
      this.lastId = '';
    }
    push(text) {
      this.buf += text;
      let m;
      // a lone CR at the very end may be the first half of CRLF: wait for more
      while ((m = /\r\n|\n|\r(?=[\s\S])/.exec(this.buf))) {
        const line = this.buf.slice(0, m.index);
        this.buf = this.buf.slice(m.index + m[0].length);
        this.line(line);
      }
    }
    line(line) {
      if (line === '') {
        if (this.id !== null) this.lastId = this.id;
        if (this.data.length) this.dispatch(this.type || 'message', this.data.join('\n'), this.lastId);
        this.data = []; this.type = ''; this.id = null;
        return;
      }
      if (line[0] === ':') { this.comment(line.slice(1).trim()); return; }
      const i = line.indexOf(':');
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? '' : line.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') this.data.push(value);
      else if (field === 'event') this.type = value;
      else if (field === 'id' && !value.includes('\0')) this.id = value;
    }
  }

  function withParam(url, name, value) {
    const u = new URL(url, location.href);
    u.searchParams.set(name, value);
    return u.href;
  }

  function withoutParam(url, name) {
    const u = new URL(url, location.href);
    u.searchParams.delete(name);
    return u.href;
  }

  function setCookie(name, value, path, maxAgeSec) {
    const secure = location.protocol === 'https:' ? '; Secure' : '';
    const age = maxAgeSec === undefined ? '' : `; Max-Age=${maxAgeSec}`;
    document.cookie = `${name}=${encodeURIComponent(value)}; Path=${path}; SameSite=Strict${age}${secure}`;
  }

  /**
   * Answer a challenge: POST the refreshed token to the topic URL. Resolves to
   * {status, error} (status 204 = accepted). Retries 429/503 after Retry-After, a few times.
   */
  async function answerChallenge(url, token, { headers = {}, tries = 3 } = {}) {
    for (let attempt = 1; ; attempt++) {
      const res = await fetch(url, {
        method: 'POST',
        credentials: 'same-origin',
        cache: 'no-store',
        headers: Object.assign({ 'content-type': CHALLENGE_CONTENT_TYPE }, headers,
                               { Authorization: `Bearer ${token}` }),
      });
      let error = null;
      if (res.status !== 204) {
        try { error = (await res.json()).error; } catch (_) { error = null; }
      }
      if ((res.status === 429 || res.status === 503) && attempt < tries) {
        const wait = Math.min(Number(res.headers.get('retry-after')) || 1, 10);
        await new Promise((r) => setTimeout(r, wait * 1000));
        continue;
      }
      return { status: res.status, error };
    }
  }

  function follow(url, opts) {
    const o = Object.assign({
      mode: 'fetch',
      queryParam: 'token',
      cookieName: 'revenprox_token',
      cookiePath: null,           // default: the topic URL's directory, e.g. /events/
      answerChallenges: true,
      reconnectOnMismatch: true,
      reconnectDelayMs: 1000,
      maxReconnects: 5,           // consecutive failed reconnections before giving up
      eventTypes: [],             // extra upstream event types for EventSource modes
      onEvent: noop, onChallenge: noop, onReauthorized: noop, onHeartbeat: noop,
      onExpired: noop, onStatus: noop,
    }, opts);
    if (typeof o.getToken !== 'function') throw new TypeError('RevenProx.follow: getToken is required');
    if (!['fetch', 'query', 'cookie'].includes(o.mode)) throw new TypeError(`RevenProx.follow: unknown mode ${o.mode}`);

    const topicUrl = withoutParam(url, o.queryParam);
    const cookiePath = o.cookiePath || new URL(topicUrl).pathname.replace(/[^/]*$/, '');
    let token = null;          // the token the stream currently runs on
    let es = null;             // EventSource (query/cookie modes)
    let abort = null;          // AbortController (fetch mode)
    let closed = false;        // closed by the caller
    let expired = false;       // `event: expired` seen: over for good
    let everOpen = false;      // a stream was open once: a lost connection is worth a reconnect
    let retries = 0;           // reconnections since the last open stream
    let lastEventId = '';
    let timer = null;

    const status = (s, d) => { try { o.onStatus(s, d); } catch (e) { console.error(e); } };

    async function onChallenge(data) {
      let info = {};
      try { info = JSON.parse(data); } catch (_) { /* keep {} */ }
      o.onChallenge(info);
      const answer = typeof o.answerChallenges === 'function' ? o.answerChallenges() : o.answerChallenges;
      if (!answer || closed || expired) return;
      try {
        const fresh = await o.getToken('challenge');
        token = fresh;
        if (o.mode === 'cookie') setCookie(o.cookieName, fresh, cookiePath);
        const headers = Object.assign({}, info.headers || {});
        const r = await answerChallenge(topicUrl, fresh, { headers });
        o.onReauthorized(r.status, r.error);
        // 403 user_mismatch: this Envoy holds no stream of ours (the POST was balanced to another
        // replica). The stream would end at the old expiry: reconnect now with a fresh token.
        if (r.status === 403 && o.reconnectOnMismatch && !closed && !expired) retryLater('challenge answer reached another replica');
      } catch (e) {
        o.onReauthorized(0, String(e));
      }
    }

    function onExpired(data) {
      expired = true;
      let info = {};
      try { info = JSON.parse(data); } catch (_) { /* keep {} */ }
      stop();
      if (o.mode === 'cookie') setCookie(o.cookieName, '', cookiePath, 0);
      o.onExpired(info);
      status('expired', info.reason || '');
    }

    function dispatch(type, data, id) {
      if (id) lastEventId = id;
      if (type === 'challenge') onChallenge(data);
      else if (type === 'expired') onExpired(data);
      else o.onEvent(type, data, id);
    }

    function stop() {
      clearTimeout(timer);
      if (es) { es.close(); es = null; }
      if (abort) { abort.abort(); abort = null; }
    }

    function retryLater(why) {
      stop();
      if (closed || expired) return;
      if (!everOpen || retries >= o.maxReconnects) {
        status('error', everOpen ? `gave up reconnecting: ${why}` : why);
        return;
      }
      retries++;
      status('reconnecting', why);
      timer = setTimeout(() => connect('reconnect'), o.reconnectDelayMs);
    }

    async function connect(why) {
      if (closed || expired) return;
      status('connecting', why);
      try {
        token = why === 'reconnect' && token ? await o.getToken('reconnect') : await o.getToken('connect');
      } catch (e) {
        status('error', `no token: ${e}`);
        return;
      }
      if (closed) return;
      if (o.mode === 'fetch') return connectFetch();
      if (o.mode === 'cookie') setCookie(o.cookieName, token, cookiePath);
      const src = o.mode === 'query' ? withParam(topicUrl, o.queryParam, token) : topicUrl;
      const source = new EventSource(src);
      es = source;
      source.onopen = () => { everOpen = true; retries = 0; status('open', o.mode); };
      source.onmessage = (e) => { if (e.lastEventId) lastEventId = e.lastEventId; o.onEvent('message', e.data, e.lastEventId); };
      for (const t of o.eventTypes) source.addEventListener(t, (e) => o.onEvent(t, e.data, e.lastEventId));
      // Native EventSource delivers named events only to addEventListener(name).
      source.addEventListener('challenge', (e) => onChallenge(e.data));
      source.addEventListener('expired', (e) => onExpired(e.data));
      source.onerror = () => {
        if (es !== source || closed || expired) return;
        // Refused (401/403/404/429/503: EventSource does not expose the status), or a lost
        // connection. The browser would retry with the URL/cookie it started with; retry
        // ourselves with a current token instead (only after a stream was open once).
        const refused = source.readyState === EventSource.CLOSED;
        retryLater(refused ? 'refused (EventSource hides the status: 401, 403, 404, 429 or 503)'
                           : 'connection lost');
      };
    }

    async function connectFetch() {
      const ctl = new AbortController();
      abort = ctl;
      const headers = { Accept: 'text/event-stream', Authorization: `Bearer ${token}` };
      if (lastEventId) headers['Last-Event-ID'] = lastEventId;
      let res;
      try {
        res = await fetch(topicUrl, { headers, signal: ctl.signal, cache: 'no-store', credentials: 'same-origin' });
      } catch (e) {
        if (abort !== ctl || closed || expired) return;
        retryLater(String(e));
        return;
      }
      if (!res.ok) {
        let code = '';
        try { code = (await res.json()).error || ''; } catch (_) { /* not JSON */ }
        if (abort === ctl) retryLater(`${res.status} ${code}`.trim());
        return;
      }
      everOpen = true;
      retries = 0;
      status('open', o.mode);
      const parser = new SseParser(dispatch, (text) => { if (text === 'heartbeat') o.onHeartbeat(); });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
        }
      } catch (e) {
        // the filter ends an expired stream with a reset: not an error once `expired` was seen
        if (abort !== ctl || closed || expired) return;
        retryLater(String(e));
        return;
      }
      if (abort === ctl && !closed && !expired) retryLater('stream ended');
    }

    connect('connect');

    return {
      close() {
        closed = true;
        stop();
        if (o.mode === 'cookie') setCookie(o.cookieName, '', cookiePath, 0);
        status('closed', 'by the page');
      },
      get token() { return token; },
      get mode() { return o.mode; },
    };
  }

  return { follow, answerChallenge, SseParser, CHALLENGE_CONTENT_TYPE };
});
