// The textmill playground: compose, watch, score and share completions through the public
// API (/v1/models, /v1/completions) only, as any client could.
import {
  ChoiceText, alternatives, codePoints, curlSnippet, decodeState, describeError, encodeState,
  fmtLogprob, fmtProb, isByteToken, pythonSnippet, scoreSummary, showToken,
} from "./render.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "textmill.apiKey";
// The page's own URL minus the page: the API lives beside it (also behind a path prefix).
const API_BASE = new URL(".", document.baseURI).href.replace(/\/$/, "");
const FIELDS = ["prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "best_of", "seed",
  "presence_penalty", "frequency_penalty", "logprobs", "echo", "stop", "logit_bias"];
const NUMBER_FIELDS = ["max_tokens", "temperature", "top_p", "n", "best_of", "seed", "presence_penalty",
  "frequency_penalty", "logprobs"];

const page = {
  models: [],
  run: null,      // the request in flight: {controller, body, results}
  inspected: null, // {span, view, token}
  hideTimer: null,
  quietFocus: null, // a token that gets focus back without opening the inspector again
};

// ---------------------------------------------------------------- API

function apiKey() { return sessionStorage.getItem(KEY_STORAGE) || ""; }

function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  return fetch(`${API_BASE}/${path}`, { ...init, headers });
}

async function readError(resp) {
  const text = await resp.text();
  let payload = text;
  try { payload = JSON.parse(text); } catch { /* not JSON: shown as it came */ }
  return describeError(resp.status, payload);
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const head = document.createElement("strong");
  head.textContent = [err.status ?? "not sent", err.type].filter(Boolean).join(" ");
  const msg = document.createElement("span");
  msg.className = "message";
  msg.textContent = err.message;
  box.append(head, " ", msg);
  for (const [label, value] of [["param", err.param], ["code", err.code]]) {
    // An API error names its param even when it is null (no one field is to blame).
    if (value === undefined || (value === null && (label === "code" || !err.type))) continue;
    const part = document.createElement("span");
    part.className = label;
    part.textContent = `${label}: ${value}`;
    box.append(" ", part);
  }
  box.hidden = false;
  if (err.param && $(err.param)) $(err.param).setAttribute("aria-invalid", "true");
  if (err.status === 401) showAuth();
}

function clearError() {
  $("error").hidden = true;
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// ---------------------------------------------------------------- auth and models

function showAuth() {
  $("auth").hidden = false;
  $("api-key").value = apiKey();
  $("api-key").focus();
}

async function loadModels() {
  let resp;
  try {
    resp = await api("v1/models");
  } catch (e) {
    showError({ status: null, message: `The server cannot be reached: ${e.message}` });
    return;
  }
  if (!resp.ok) {
    const err = await readError(resp);
    showError(err);
    // The port opens before the model is loaded (/health says "loading"): ask again shortly.
    if (err.code === "model_loading") setTimeout(loadModels, 1000);
    return;
  }
  clearError();
  $("auth").hidden = true;
  $("key-button").hidden = !apiKey();
  page.models = (await resp.json()).data || [];
  const select = $("model");
  const wanted = select.dataset.wanted || select.value;
  select.replaceChildren(...page.models.map((m) => new Option(m.id, m.id)));
  if (page.models.some((m) => m.id === wanted)) select.value = wanted;
  modelChanged();
  document.body.dataset.ready = "1";
}

function currentModel() { return page.models.find((m) => m.id === $("model").value) || null; }

function modelChanged() {
  const model = currentModel();
  // supports_suffix is textmill's addition to the model card; another server's card lacks it,
  // and then the box is shown and the server's answer decides.
  $("suffix-row").hidden = !!model && model.supports_suffix === false;
  if (model && model.max_model_len) $("max_tokens").max = model.max_model_len;
}

// ---------------------------------------------------------------- compose

function unescapeStop(line) {
  return line.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

// The request exactly as it will be sent (and as the share buttons print it), or a local error.
function buildBody() {
  const body = { model: $("model").value, prompt: $("prompt").value };
  if (!$("suffix-row").hidden && $("suffix").value) body.suffix = $("suffix").value;
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    if (input.validity.badInput) return { error: { message: `${name} is not a number.`, param: name } };
    if (input.value === "") continue;
    const value = Number(input.value);
    if (!Number.isSafeInteger(value) && name === "seed") {
      return { error: { message: "seed must be an integer within ±2^53 here (JavaScript numbers).", param: "seed" } };
    }
    body[name] = value;
  }
  const stops = $("stop").value.split("\n").filter((s) => s !== "").map(unescapeStop);
  if (stops.length) body.stop = stops.length === 1 ? stops[0] : stops;
  if ($("logit_bias").value.trim()) {
    try {
      body.logit_bias = JSON.parse($("logit_bias").value);
    } catch (e) {
      return { error: { message: `logit_bias is not valid JSON: ${e.message}`, param: "logit_bias" } };
    }
  }
  body.echo = $("echo").checked;
  // Streaming with best_of > n is refused by the API (the best are known only at the end).
  const n = body.n ?? 1;
  if (!(body.best_of !== undefined && body.best_of > n)) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  const ordered = {};
  for (const k of ["model", "prompt", "suffix", ...FIELDS, "stream", "stream_options"]) {
    if (k in body && !(k in ordered)) ordered[k] = body[k];
  }
  return { body: ordered };
}

function resultCard(index, body) {
  const card = document.createElement("article");
  card.className = "result";
  card.dataset.index = index;
  card.dataset.state = "running";
  const h = document.createElement("h3");
  h.textContent = `choice ${index}`;
  const finish = document.createElement("span");
  finish.className = "finish";
  h.append(" ", finish);
  const text = document.createElement("div");
  text.className = "text";
  text.setAttribute("aria-label", `Choice ${index} text`);
  const stats = document.createElement("p");
  stats.className = "stats";
  const usage = document.createElement("p");
  usage.className = "usage";
  card.append(h, text, stats, usage);
  const base = body.echo ? 0 : codePoints(body.prompt).length;
  const choice = new ChoiceText(text, base);
  const result = { card, text, stats, usage, finish, choice, body, promptLength: codePoints(body.prompt).length,
    first: null, last: null, generated: 0, chunks: 0, finishReason: null };
  wireTokens(text, () => ({ choice, kind: "compose", body }));
  return result;
}

async function run() {
  if (!$("compose").hidden) return runCompose();
  return runScore();
}

async function runCompose() {
  stop();
  clearError();
  hideInspector();
  const built = buildBody();
  if (built.error) { showError({ status: null, ...built.error }); return; }
  const body = built.body;
  saveState();
  const controller = new AbortController();
  const results = new Map();
  const runState = { controller, body, results, started: performance.now(), usage: null };
  page.run = runState;
  $("results").replaceChildren();
  $("results").dataset.state = "running";
  setRunning(true);
  status("Running…");
  const ensure = (index) => {
    if (!results.has(index)) {
      const r = resultCard(index, body);
      results.set(index, r);
      const sorted = [...results.values()].sort((a, b) => a.card.dataset.index - b.card.dataset.index);
      $("results").replaceChildren(...sorted.map((x) => x.card));
    }
    return results.get(index);
  };
  let finalState = "done";
  try {
    const resp = await api("v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) { showError(await readError(resp)); finalState = "error"; return; }
    if (body.stream) {
      await readStream(resp, (event) => {
        // An error after the stream began arrives as an event; the HTTP status was already 200.
        if (event.error) { showError(describeError("in stream:", event)); finalState = "error"; return; }
        if (event.usage) runState.usage = event.usage;
        for (const c of event.choices || []) addChunk(ensure(c.index), c, runState);
      });
    } else {
      const completion = await resp.json();
      runState.usage = completion.usage;
      for (const c of completion.choices) addChunk(ensure(c.index), c, runState);
    }
  } catch (e) {
    if (e.name === "AbortError") finalState = "stopped";
    else { showError({ status: null, message: `The request failed: ${e.message}` }); finalState = "error"; }
  } finally {
    for (const r of results.values()) finishResult(r, runState, finalState);
    // A run stopped because a newer one started leaves the page to the newer one.
    if (page.run === runState) {
      page.run = null;
      $("results").dataset.state = finalState;
      setRunning(false);
      const seconds = ((performance.now() - runState.started) / 1000).toFixed(2);
      status({ done: `Done in ${seconds} s.`, error: "The request failed.",
        stopped: `Stopped after ${seconds} s: the connection was closed, so the server aborted the request.` }[finalState]);
    }
  }
}

async function readStream(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data !== "[DONE]") onEvent(JSON.parse(data));
      }
    }
  }
}

function addChunk(result, c, runState) {
  const now = performance.now();
  const added = result.choice.append(c.text || "", c.logprobs);
  result.chunks += 1;
  // Echoed prompt tokens are not generated ones; their offsets lie inside the prompt.
  result.generated += added.filter((t) => t.offset >= result.promptLength || !result.body.echo).length;
  if ((c.text || added.length) && result.first === null) result.first = now;
  result.last = now;
  if (c.finish_reason) result.finishReason = c.finish_reason;
  const first = result.text.querySelector(".tok");
  if (first && first.tabIndex !== 0) first.tabIndex = 0;
  writeStats(result, runState);
}

function writeStats(result, runState) {
  const parts = [];
  if (runState.body.stream && result.first !== null) {
    parts.push(`TTFT ${Math.round(result.first - runState.started)} ms`);
    const count = runState.body.logprobs !== undefined ? result.generated : result.chunks;
    if (count > 1 && result.last > result.first) {
      parts.push(`${((count - 1) / ((result.last - result.first) / 1000)).toFixed(1)} tok/s`);
    }
  } else if (!runState.body.stream) {
    parts.push(`not streamed (best_of > n): ${Math.round(result.last - runState.started)} ms in all`);
  }
  if (runState.body.logprobs !== undefined) parts.push(`${result.generated} tokens`);
  result.stats.textContent = parts.join(" · ");
}

function finishResult(result, runState, state) {
  result.card.dataset.state = result.finishReason ? "done" : state;
  result.finish.textContent = result.finishReason ? `finish: ${result.finishReason}` : state === "done" ? "" : state;
  writeStats(result, runState);
  const u = runState.usage;
  if (u) {
    const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0;
    result.usage.textContent = `usage (request): prompt ${u.prompt_tokens} · completion ${u.completion_tokens}` +
      ` · total ${u.total_tokens} · cached ${cached}`;
  }
}

function stop() {
  // Closing the connection is the API's way to cancel: the server aborts the request.
  if (page.run) page.run.controller.abort();
}

function setRunning(running) { $("stop-button").disabled = !running; }

function status(text) { $("status").textContent = text; }

// ---------------------------------------------------------------- score

async function runScore() {
  clearError();
  hideInspector();
  saveState();
  const text = $("score-text").value;
  const body = { model: $("model").value, prompt: text, max_tokens: 0, echo: true, logprobs: 5 };
  const out = $("score-result");
  out.replaceChildren();
  out.dataset.state = "running";
  $("score-summary").hidden = true;
  let resp;
  try {
    resp = await api("v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
  } catch (e) {
    showError({ status: null, message: `The request failed: ${e.message}` });
    out.dataset.state = "error";
    return;
  }
  if (!resp.ok) { showError(await readError(resp)); out.dataset.state = "error"; return; }
  const completion = await resp.json();
  const choice = new ChoiceText(out, 0);
  choice.append(completion.choices[0].text, completion.choices[0].logprobs);
  const first = out.querySelector(".tok");
  if (first) first.tabIndex = 0;
  wireTokens(out, () => ({ choice, kind: "score", body }));
  const s = scoreSummary(choice.tokens);
  $("score-total").textContent = s.total.toFixed(4);
  $("score-ppl").textContent = s.perplexity === null ? "n/a" : s.perplexity.toFixed(3);
  $("score-count").textContent = String(s.count);
  $("score-summary").hidden = false;
  out.dataset.state = "done";
}

// ---------------------------------------------------------------- token inspector

function wireTokens(container, viewOf) {
  const tokenOf = (target) => (target instanceof Element ? target.closest(".tok") : null);
  container.addEventListener("mouseover", (e) => { const t = tokenOf(e.target); if (t) inspect(t, viewOf()); });
  container.addEventListener("focusin", (e) => {
    const t = tokenOf(e.target);
    if (t && page.quietFocus === t) page.quietFocus = null;  // focus given back by Esc: stay closed
    else if (t) inspect(t, viewOf());
  });
  container.addEventListener("mouseout", (e) => { if (tokenOf(e.target)) hideSoon(); });
  container.addEventListener("focusout", (e) => { if (tokenOf(e.target)) hideSoon(); });
  container.addEventListener("click", (e) => { const t = tokenOf(e.target); if (t) t.focus(); });
  container.addEventListener("keydown", (e) => {
    const t = tokenOf(e.target);
    if (!t) return;
    const tokens = [...container.querySelectorAll(".tok")];
    const i = tokens.indexOf(t);
    const moveTo = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tokens.length - 1 }[e.key];
    if (moveTo !== undefined && tokens[moveTo]) {
      e.preventDefault();
      t.tabIndex = -1;
      tokens[moveTo].tabIndex = 0;
      tokens[moveTo].focus();
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      const alt = $("inspector").querySelector("button");
      if (alt) alt.focus();
    }
  });
}

function inspect(span, view) {
  clearTimeout(page.hideTimer);
  const token = view.choice.tokens[Number(span.dataset.index)];
  if (!token) return;
  if (page.inspected && page.inspected.span === span) return;
  page.inspected = { span, view, token };
  const box = $("inspector");
  box.replaceChildren();
  const head = document.createElement("p");
  head.className = "chosen";
  const code = document.createElement("code");
  code.textContent = showToken(token.token);
  head.append(code, ` logprob ${fmtLogprob(token.logprob)}`, token.logprob === null ? " (the first token has no context)" :
    ` · p ${fmtProb(token.logprob)}`);
  box.append(head);
  const alts = alternatives(token);
  if (alts.length) {
    const list = document.createElement("ol");
    list.className = "alts";
    for (const alt of alts) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = alt.chosen ? "alt chosen" : "alt";
      button.dataset.text = alt.text;
      button.dataset.logprob = String(alt.logprob);
      button.style.setProperty("--p", Math.exp(alt.logprob).toFixed(4));
      const label = document.createElement("code");
      label.className = "alt-text";
      label.textContent = showToken(alt.text);
      const lp = document.createElement("span");
      lp.className = "alt-logprob";
      lp.textContent = fmtLogprob(alt.logprob);
      const p = document.createElement("span");
      p.className = "alt-prob";
      p.textContent = fmtProb(alt.logprob);
      button.append(label, lp, p);
      if (isByteToken(alt.text)) {
        button.disabled = true;
        button.title = "part of a character: cannot be sent as text";
      } else {
        button.title = "continue from here with this token";
        button.addEventListener("click", () => continueFrom(view, token, alt.text));
      }
      item.append(button);
      list.append(item);
    }
    box.append(list);
  } else if (token.logprob !== null) {
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.textContent = "Set logprobs above 0 to see alternatives.";
    box.append(hint);
  }
  box.hidden = false;
  const r = span.getBoundingClientRect();
  const width = box.offsetWidth;
  box.style.left = `${Math.max(4, Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - width - 4))}px`;
  box.style.top = `${window.scrollY + r.bottom + 4}px`;
}

function hideSoon() {
  clearTimeout(page.hideTimer);
  page.hideTimer = setTimeout(() => {
    const box = $("inspector");
    if (box.matches(":hover") || box.contains(document.activeElement)) return;
    if (page.inspected && page.inspected.span === document.activeElement) return;
    hideInspector();
  }, 250);
}

function hideInspector() {
  clearTimeout(page.hideTimer);
  $("inspector").hidden = true;
  page.inspected = null;
}

// A new request from just before `token`, with `text` in its place: the prefix (prompt and
// the choice's text up to the token) plus the alternative becomes the prompt.
function continueFrom(view, token, text) {
  const full = view.kind === "score" || view.body.echo ? view.choice.text : view.body.prompt + view.choice.text;
  const prompt = codePoints(full).slice(0, token.offset).join("") + text;
  hideInspector();
  $("prompt").value = prompt;
  if (view.kind === "score") selectMode("compose");
  runCompose();
}

// ---------------------------------------------------------------- share and state

async function copy(text, what) {
  const pre = $("snippet");
  pre.textContent = text;
  pre.hidden = false;
  pre.dataset.kind = what;
  try {
    await navigator.clipboard.writeText(text);
    status(`Copied ${what}.`);
  } catch {
    // No clipboard on a plain-http page served from another host: the text is shown to copy by hand.
    const range = document.createRange();
    range.selectNodeContents(pre);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    status(`The clipboard is not available here: the ${what} is selected below.`);
  }
}

function share(kind) {
  const built = buildBody();
  if (built.error) { showError({ status: null, ...built.error }); return; }
  const withKey = !!apiKey();
  if (kind === "curl") copy(curlSnippet(API_BASE, built.body, withKey), "curl command");
  else copy(pythonSnippet(API_BASE, built.body, withKey), "Python code");
}

function formState() {
  const state = { mode: $("compose").hidden ? "score" : "compose", model: $("model").value };
  for (const name of FIELDS) state[name] = name === "echo" ? $("echo").checked : $(name).value;
  state.score = $("score-text").value;
  return state;
}

function saveState() {
  history.replaceState(null, "", `#${encodeState(formState())}`);
}

function restoreState() {
  const state = decodeState(location.hash);
  if (!Object.keys(state).length) return false;
  for (const name of FIELDS) {
    if (name === "echo") $("echo").checked = state.echo === "1";
    else $(name).value = state[name] ?? "";  // left out of the fragment: it was empty
  }
  if (state.model) $("model").dataset.wanted = state.model;
  if (state.score !== undefined) $("score-text").value = state.score;
  selectMode(state.mode === "score" ? "score" : "compose");
  return state.run === "1";
}

function selectMode(mode) {
  for (const m of ["compose", "score"]) {
    $(m).hidden = m !== mode;
    $(`tab-${m}`).setAttribute("aria-selected", String(m === mode));
  }
  hideInspector();
}

// ---------------------------------------------------------------- start

function start() {
  $("compose-form").addEventListener("submit", (e) => { e.preventDefault(); runCompose(); });
  $("score-form").addEventListener("submit", (e) => { e.preventDefault(); runScore(); });
  $("stop-button").addEventListener("click", stop);
  $("tab-compose").addEventListener("click", () => { selectMode("compose"); saveState(); });
  $("tab-score").addEventListener("click", () => { selectMode("score"); saveState(); });
  $("model").addEventListener("change", () => { modelChanged(); saveState(); });
  $("copy-curl").addEventListener("click", () => share("curl"));
  $("copy-python").addEventListener("click", () => share("python"));
  $("copy-link").addEventListener("click", () => {
    saveState();
    copy(`${location.href.split("#")[0]}#${encodeState({ ...formState(), run: true })}`, "link");
  });
  $("key-button").addEventListener("click", showAuth);
  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    clearError();  // what shows next is this key's answer
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    $("key-button").hidden = true;
  });
  for (const form of ["compose-form", "score-form"]) {
    $(form).addEventListener("input", () => saveState());
  }
  const inspector = $("inspector");
  inspector.addEventListener("mouseleave", hideSoon);
  inspector.addEventListener("mouseenter", () => clearTimeout(page.hideTimer));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      run();
    } else if (e.key === "Escape") {
      const back = inspector.contains(document.activeElement) && page.inspected ? page.inspected.span : null;
      if (page.run) stop();
      hideInspector();
      if (back) { page.quietFocus = back; back.focus(); }
    }
  });
  const autoRun = restoreState();
  loadModels().then(() => { if (autoRun && document.body.dataset.ready) run(); });
}

start();
