// The page of `dlm serve`: streams a request with "diffusing": true and draws each canvas snapshot as it arrives.
// Each generated position is a <span>: masked (grey), or its token coloured by the step it was committed at
// (hue: blue early -> red late) and faded by its confidence. No build step, no library.
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function numberOr(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

async function init() {
  $("api_key").value = localStorage.getItem("dlm_api_key") || "";
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const info = await r.json();
    const m = info.data[0];
    $("model").textContent = `${m.id} · ${m.process} · context ${m.context} · default sampler ${m.default_sampler}`;
    if (m.edits) $("edit-mode").hidden = false;
  } catch (e) { $("model").textContent = "(GET /v1/models failed: an API key may be needed)"; }
  document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", () => {
    const edit = mode() === "edit";
    $("edit-row").hidden = !edit;
    $("suffix-row").hidden = edit;
    $("prompt").parentElement.hidden = edit;
  }));
  $("generate").addEventListener("click", run);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("api_key").addEventListener("change", () => localStorage.setItem("dlm_api_key", $("api_key").value.trim()));
}

// One view of a generation: commit step and confidence per position, kept across snapshots.
function View(total) {
  this.total = total;
  this.when = [];
  this.conf = [];
}
View.prototype.draw = function (snap) {
  const canvas = $("canvas");
  for (const [pos, c] of snap.committed || []) { this.when[pos] = snap.step; this.conf[pos] = c; }
  const frag = document.createDocumentFragment();
  const given = (text) => { const s = document.createElement("span"); s.className = "fixed"; s.textContent = text; return s; };
  if (this.before) frag.appendChild(given(this.before));
  (snap.tokens || []).forEach((tok, i) => {
    const s = document.createElement("span");
    if (tok === null) {
      s.className = "mask"; s.textContent = "░";
    } else {
      s.className = "tok";
      const when = this.when[i] === undefined ? snap.step : this.when[i];
      this.when[i] = when;
      const hue = 220 - 220 * Math.min(1, when / Math.max(1, this.total));
      const conf = this.conf[i] === undefined || this.conf[i] === null ? 1 : this.conf[i];
      s.style.background = `hsla(${hue}, 80%, 70%, ${0.25 + 0.75 * conf})`;
      s.title = `step ${when}` + (this.conf[i] != null ? `, p=${this.conf[i]}` : "");
      s.textContent = tok;
    }
    frag.appendChild(s);
  });
  if (this.after) frag.appendChild(given(this.after));
  canvas.replaceChildren(frag);
};

async function run() {
  const edit = mode() === "edit";
  const body = {
    max_tokens: numberOr("max_tokens"), steps: numberOr("steps"), seed: numberOr("seed"),
    temperature: numberOr("temperature"), stream: true, diffusing: true,
  };
  const sampler = $("sampler").value.trim();
  if (sampler) body.sampler = sampler;
  let route = "/v1/completions";
  if (edit) {
    route = "/v1/edits";
    const ta = $("edit-text");
    body.text = ta.value;
    if (ta.selectionEnd > ta.selectionStart) body.spans = [[ta.selectionStart, ta.selectionEnd]];
    delete body.max_tokens;
  } else {
    body.prompt = $("prompt").value;
    const suffix = $("suffix").value;
    if (suffix) body.suffix = suffix;
  }
  controller = new AbortController();
  $("generate").disabled = true; $("stop").disabled = false;
  $("status").textContent = "waiting"; $("result").textContent = "";
  const started = performance.now();
  const view = new View(body.steps || body.max_tokens || 1);
  if (!edit) { view.before = body.prompt; view.after = body.suffix || ""; }
  let committed = 0;
  try {
    const r = await fetch(route, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                   signal: controller.signal });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error(`${r.status}: ${(e.error && e.error.message) || r.statusText}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { $("status").textContent = "done"; continue; }
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        const c = msg.choices && msg.choices[0];
        if (!c || c.index !== 0) continue;
        if (c.tokens) {
          view.draw(c);
          committed = c.tokens.filter((t) => t !== null).length;
          $("step").textContent = c.step; $("masks").textContent = c.masks_left; $("nfe").textContent = c.nfe;
          $("status").textContent = "denoising";
        }
        if (c.finish_reason) {
          $("result").textContent = c.text !== undefined ? c.text : (c.message || {}).content || "";
          if (c.nfe !== undefined) $("nfe").textContent = c.nfe;
          if (c.changes) {
            $("result").textContent += "\n\n" + (c.changes.length ? "changed: " + c.changes.map(
              (ch) => JSON.stringify(ch.old) + " → " + JSON.stringify(ch.new)).join(", ") : "nothing changed");
          }
        }
        const secs = (performance.now() - started) / 1000;
        $("tps").textContent = (committed / Math.max(secs, 1e-3)).toFixed(1);
      }
    }
    $("status").textContent = "done";
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  } finally {
    $("generate").disabled = false; $("stop").disabled = true; controller = null;
  }
}

init();
