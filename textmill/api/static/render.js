// The playground's pure parts: turning completion chunks into token spans, and requests
// into curl / Python snippets and URL fragments. No network and no page state here.

// The API counts text offsets in Unicode code points (Python str indices); JavaScript
// strings index UTF-16 units. Everything positional below works on code point arrays.
export const codePoints = (s) => Array.from(s);

// How hot a token is drawn, 0..1: its surprise (-logprob, in nats) up to 6 (p = 0.25%).
// On a log scale, because a sampled token's p is mostly 0.05-0.9: drawn as 1 - p nearly
// every token of a small model looked equally hot. One scale for compose and score.
export function heat(logprob) {
  if (logprob === null || logprob === undefined) return null;
  return Math.min(1, -logprob / 6);
}

// One choice's text, built chunk by chunk. `base` is where the choice's own text starts in
// the API's offset space: 0 with echo (the prompt is part of the text), else the prompt's
// length, since text_offset counts the prompt either way.
export class ChoiceText {
  constructor(container, base) {
    this.container = container;
    this.base = base;
    this.length = 0;  // code points so far
    this.text = "";
    this.tokens = [];  // {token, logprob, top, offset, text}
  }

  // Appends one chunk's text and its logprobs (or null) as spans; returns the new tokens.
  append(text, logprobs) {
    const cps = codePoints(text);
    const start = this.length;
    const end = start + cps.length;
    const piece = (a, b) => cps.slice(Math.max(a - start, 0), Math.max(b - start, 0)).join("");
    const added = [];
    if (!logprobs || !logprobs.tokens || logprobs.tokens.length === 0) {
      if (text) this.container.append(plainSpan(text));
    } else {
      const offsets = logprobs.text_offset.map((o) => Math.min(Math.max(o - this.base, start), end));
      if (offsets[0] > start) this.container.append(plainSpan(piece(start, offsets[0])));
      for (let i = 0; i < logprobs.tokens.length; i++) {
        const tokenEnd = i + 1 < offsets.length ? offsets[i + 1] : end;
        const token = {
          token: logprobs.tokens[i], logprob: logprobs.token_logprobs[i], top: logprobs.top_logprobs[i],
          offset: offsets[i] + this.base, text: piece(offsets[i], tokenEnd), index: this.tokens.length,
        };
        this.tokens.push(token);
        added.push(token);
        this.container.append(tokenSpan(token));
      }
    }
    this.length = end;
    this.text += text;
    return added;
  }
}

function plainSpan(text) {
  const span = document.createElement("span");
  span.className = "plain";
  span.textContent = text;
  return span;
}

function tokenSpan(token) {
  const span = document.createElement("span");
  span.className = token.text ? "tok" : "tok empty";  // empty: its bytes end a later character
  if (token.text.includes("\n")) span.classList.add("newline");  // else a line break alone has no width to point at
  span.textContent = token.text;
  span.dataset.index = token.index;
  span.tabIndex = -1;  // one tab stop per result (the first token); arrows move between tokens
  const h = heat(token.logprob);
  if (h === null) span.classList.add("nolp");
  else span.style.setProperty("--heat", h.toFixed(3));
  return span;
}

// Alternatives of a token, most likely first: [{text, logprob, chosen}].
export function alternatives(token) {
  const top = token.top || {};
  return Object.entries(top)
    .map(([text, logprob]) => ({ text, logprob, chosen: text === token.token }))
    .sort((a, b) => b.logprob - a.logprob);
}

export const fmtLogprob = (lp) => (lp === null || lp === undefined ? "n/a" : lp.toFixed(4));
export const fmtProb = (lp) => (lp === null || lp === undefined ? "" : (100 * Math.exp(lp)).toFixed(2) + "%");
// A token as text a reader can see: quotes show leading spaces, escapes show newlines and tabs.
export const showToken = (t) => JSON.stringify(t);

// A token's text is only usable as a prompt when the API could spell it ("bytes:\x.." is
// OpenAI's spelling of a partial UTF-8 character: it cannot be sent back as text).
export const isByteToken = (t) => t.startsWith("bytes:");

// Score: total logprob and perplexity over the tokens that have a logprob (the first has none).
export function scoreSummary(tokens) {
  const lps = tokens.map((t) => t.logprob).filter((lp) => lp !== null && lp !== undefined);
  const total = lps.reduce((a, b) => a + b, 0);
  return { total, count: lps.length, perplexity: lps.length ? Math.exp(-total / lps.length) : null };
}

// ---------------------------------------------------------------- share

function pyRepr(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  // JSON string escapes (\n, \", \\, \uXXXX) are valid Python string escapes.
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map((v) => pyRepr(v, indent)).join(", ") + "]";
  return "{" + Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyRepr(v, indent)}`).join(", ") + "}";
}

const shellQuote = (s) => "'" + s.replace(/'/g, "'\\''") + "'";

// The exact body as curl. The key is never pasted into a snippet: it is read from the
// environment the snippet runs in.
export function curlSnippet(apiBase, body, withKey) {
  const lines = [`curl ${shellQuote(apiBase + "/v1/completions")}`, `-H 'Content-Type: application/json'`];
  if (withKey) lines.push(`-H "Authorization: Bearer $TEXTMILL_API_KEY"`);
  if (body.stream) lines.push("-N");
  lines.push(`-d ${shellQuote(JSON.stringify(body, null, 2))}`);
  return lines.join(" \\\n  ");
}

// The same body through the openai package. stream / stream_options are request fields
// there too; a streamed request prints its text as it comes.
export function pythonSnippet(apiBase, body, withKey) {
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${pyRepr(v)},`);
  const key = withKey ? 'os.environ["TEXTMILL_API_KEY"]' : '"unused"';
  const head = [
    ...(withKey ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(apiBase + "/v1")}, api_key=${key})`,
  ];
  if (body.stream && (body.n ?? 1) === 1) {
    return [...head, "stream = client.completions.create(", ...args, ")", "for chunk in stream:",
      "    for choice in chunk.choices:", '        print(choice.text, end="", flush=True)', "print()"].join("\n");
  }
  if (body.stream) {  // n > 1: the choices' chunks interleave; each text is gathered by its index
    return [...head, "stream = client.completions.create(", ...args, ")", "texts = {}", "for chunk in stream:",
      "    for choice in chunk.choices:", '        texts[choice.index] = texts.get(choice.index, "") + choice.text',
      "for index in sorted(texts):", '    print(f"--- choice {index}")', "    print(texts[index])"].join("\n");
  }
  return [...head, "completion = client.completions.create(", ...args, ")",
    "for choice in completion.choices:", '    print(f"--- choice {choice.index}")', "    print(choice.text)"].join("\n");
}

// ---------------------------------------------------------------- URL fragment

// The page's fields as "#k=v&..." (URLSearchParams: readable and safely escaped).
export function encodeState(fields) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(fields)) {
    if (v !== "" && v !== null && v !== undefined && v !== false) params.set(k, v === true ? "1" : String(v));
  }
  return params.toString();
}

export function decodeState(hash) {
  const params = new URLSearchParams(hash.replace(/^#/, ""));
  return Object.fromEntries(params.entries());
}

// ---------------------------------------------------------------- errors

// An API error as OpenAI shapes it: {error: {message, type, param, code}}; anything else
// (a proxy's HTML page, a dropped connection) is shown as it came.
export function describeError(status, payload) {
  const e = payload && typeof payload === "object" && payload.error ? payload.error : null;
  if (!e) return { status, message: typeof payload === "string" && payload ? payload : `HTTP ${status}`,
    type: null, param: null, code: null };
  return { status, message: e.message ?? String(e), type: e.type ?? null, param: e.param ?? null, code: e.code ?? null };
}
