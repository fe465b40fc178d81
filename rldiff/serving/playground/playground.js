// The playground: two policies on the same seeds, through the service's own API (GET /v1/policy,
// POST /v1/generate). No framework and nothing from elsewhere; every chart is SVG drawn here.
// Timings of each comparison are kept in window.playground.timings (ms since the click).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const KEY_STORE = "rldiff-api-key"; // sessionStorage: this tab only
// Okabe-Ito colours, one per solver expert; unknown names take the spare ones in order.
const EXPERT_COLOURS = {
  euler: "#0072B2",
  "dpmpp-2m": "#E69F00",
  unipc: "#009E73",
  heun: "#D55E00",
  "euler-ancestral": "#CC79A7",
  ipndm: "#56B4E9",
};
const SPARE_COLOURS = ["#F0E442", "#000000", "#882255", "#44AA99", "#999933"];
const STATUS_WORDS = {
  400: "the body is not valid JSON",
  401: "API key missing or wrong",
  408: "the request body came too slowly",
  413: "the request is too large",
  422: "the request was refused",
  431: "the request headers are too large",
  500: "a fault of the service",
  503: "the service is busy",
};

const state = { info: null, key: sessionStorage.getItem(KEY_STORE) || "", run: 0 };
window.playground = { timings: [], state };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function expertColour(name) {
  if (!(name in EXPERT_COLOURS)) {
    const used = Object.keys(EXPERT_COLOURS).length - 6;
    EXPERT_COLOURS[name] = SPARE_COLOURS[used % SPARE_COLOURS.length];
  }
  return EXPERT_COLOURS[name];
}

// --- the API ------------------------------------------------------------------------------

async function api(path, body) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const init = { method: body === undefined ? "GET" : "POST", headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const start = performance.now();
  let response;
  try {
    response = await fetch(path, init); // relative: the page lives beside the API
  } catch (err) {
    return { ok: false, status: 0, network: String(err.message || err), ms: 0 };
  }
  const text = await response.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = null;
  }
  const ms = performance.now() - start;
  return { ok: response.ok, status: response.status, body: parsed, text, ms };
}

// An API answer that is not a success, in words: the status, the service's `error` and each
// field it names (`details`).
function describe(answer) {
  if (answer.network !== undefined) {
    return { summary: `Could not reach the service: ${answer.network}`, details: [] };
  }
  const words = STATUS_WORDS[answer.status] || "unexpected answer";
  const body = answer.body;
  if (body && typeof body === "object" && typeof body.error === "string") {
    const details = (body.details || [])
      .filter((d) => d && d.message && !body.error.includes(d.message))
      .map((d) => (d.field ? `${d.field}: ${d.message}` : d.message));
    return { summary: `Error ${answer.status} (${words}): ${body.error}`, details };
  }
  const text = (answer.text || "").trim().slice(0, 300);
  return { summary: `Error ${answer.status} (${words})${text ? `: ${text}` : ""}`, details: [] };
}

function showError(problems) {
  const box = $("error");
  box.replaceChildren();
  if (!problems.length) {
    box.hidden = true;
    return;
  }
  for (const { title, summary, details } of problems) {
    const p = el("p", { class: "error-text" });
    if (title) p.append(el("strong", {}, `${title}: `));
    p.append(summary);
    box.append(p);
    if (details.length) {
      const list = el("ul");
      for (const d of details) list.append(el("li", {}, d));
      box.append(list);
    }
  }
  box.hidden = false;
}

function askForKey(message) {
  $("key-box").hidden = false;
  $("api-key").focus();
  showError([{ title: "API key", summary: message, details: [] }]);
}

// --- the service's policies -----------------------------------------------------------------

async function loadPolicy() {
  $("generate").disabled = true;
  const answer = await api("v1/policy");
  if (answer.status === 401) {
    askForKey(
      state.key
        ? "The service refused this key. Enter the right one."
        : "The service requires an API key. Enter it above.",
    );
    $("service").textContent = "Waiting for an API key.";
    return;
  }
  if (!answer.ok) {
    const { summary, details } = describe(answer);
    showError([{ title: "Loading the policies", summary, details }]);
    $("service").textContent = "The service did not answer as expected.";
    return;
  }
  state.info = answer.body;
  showError([]);
  if (answer.body.api_key_required) $("key-box").hidden = false;
  fillControls(answer.body);
  $("generate").disabled = false;
}

function fillControls(info) {
  const { limits, learned, model } = info;
  const serving = learned
    ? `learned policy ${learned.name}${learned.untrained ? " (untrained)" : ""} from ${learned.directory}`
    : `DEGRADED: ${info.serving}`;
  $("service").textContent = `Model ${model.spec} (${model.classes} classes) · ${serving}`;
  $("service").classList.toggle("warn", Boolean(info.degraded));

  const label = $("label");
  label.replaceChildren(el("option", { value: "-1" }, "none (unconditional)"));
  for (let c = 0; c < model.classes; c++) label.append(el("option", { value: String(c) }, `class ${c}`));
  if (model.classes > 0) label.value = "0";

  setRange($("guidance"), limits.min_guidance, limits.max_guidance);
  setRange($("budget"), limits.min_budget, limits.max_budget);
  setRange($("n"), 1, limits.max_samples);
  const budgets = (learned && learned.budgets) || null;
  let budget = Number($("budget").value);
  if (budgets && !budgets.includes(budget)) budget = budgets[budgets.length - 1];
  $("budget").value = String(Math.min(Math.max(budget, limits.min_budget), limits.max_budget));
  if (!$("seed").value) newSeed();

  for (const [id, choice] of [["policy-a", "learned"], ["policy-b", baselineFor(info, budget)]]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren();
    for (const name of info.policies) {
      const text = name === "learned" && learned ? `learned (${learned.name})` : name;
      select.append(el("option", { value: name }, text));
    }
    select.value = keep && info.policies.includes(keep) ? keep : choice;
  }
  $("hint").textContent =
    `${info.budget.charAt(0).toUpperCase()}${info.budget.slice(1)}. ` +
    (budgets
      ? `The learned policy serves budgets ${budgets.join(", ")}; baselines any budget from ` +
        `${limits.min_budget} to ${limits.max_budget}.`
      : `Budgets ${limits.min_budget} to ${limits.max_budget}.`);
}

function setRange(input, min, max) {
  input.min = String(min);
  input.max = String(max);
}

function baselineFor(info, budget) {
  const row = (info.evaluation || {})[String(budget)] || {};
  const names = info.policies.filter((p) => p !== "learned");
  if (row.best_hand_built && names.includes(row.best_hand_built)) return row.best_hand_built;
  return names.find((p) => p.startsWith("fixed:")) || names[0] || "learned";
}

// The mean reference RMSE of the evaluation beside the policy, for the policy that ran at this
// budget, or null where that evaluation has no figure for it.
function referenceRmse(info, served, budget) {
  const row = (info.evaluation || {})[String(budget)];
  if (!row) return null;
  for (const family of ["learned", "global", "hand_built"]) {
    if (row[`best_${family}`] === served && typeof row[`best_${family}_rmse`] === "number") {
      return { rmse: row[`best_${family}_rmse`], nfe: row[`best_${family}_mean_nfe`] };
    }
  }
  return null;
}

// --- a comparison -----------------------------------------------------------------------------

function readForm() {
  const number = (id, what, integer) => {
    const raw = $(id).value.trim();
    const value = Number(raw);
    if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(`${what} must be ${integer ? "a whole number" : "a number"}, not "${raw}"`);
    }
    return value;
  };
  const n = number("n", "Samples", true);
  const seed = number("seed", "First seed", true);
  if (n < 1 || n > 64) throw new Error("Samples must be between 1 and 64");
  return {
    labels: Number($("label").value),
    guidance: number("guidance", "Guidance", false),
    budget: number("budget", "Budget", true),
    seeds: Array.from({ length: n }, (_, i) => seed + i),
    output: "png",
    policies: [$("policy-a").value, $("policy-b").value],
  };
}

function layout(request) {
  // Cells in reading order A-head, B-head, A1, B1, A2, B2, ...: two columns side by side on a
  // wide screen, one column (each seed's A above its B) on a phone.
  const compare = $("compare");
  compare.replaceChildren();
  const cells = { heads: [], samples: [[], []] };
  for (let side = 0; side < 2; side++) {
    const head = el("div", { class: "cell head", "data-side": "AB"[side] });
    head.append(el("h2", {}, `${"AB"[side]}: ${request.policies[side]}`));
    head.append(el("p", { class: "muted" }, "waiting for the service…"));
    cells.heads.push(head);
    compare.append(head);
  }
  request.seeds.forEach((seed) => {
    for (let side = 0; side < 2; side++) {
      const cell = el("div", { class: "cell sample pending", "data-side": "AB"[side] });
      cell.append(el("p", { class: "muted" }, `${"AB"[side]} · seed ${seed}`));
      cells.samples[side].push(cell);
      compare.append(cell);
    }
  });
  return cells;
}

async function generate(event) {
  event.preventDefault();
  const clicked = performance.now();
  let request;
  try {
    request = readForm();
  } catch (err) {
    showError([{ title: "Form", summary: err.message, details: [] }]);
    return;
  }
  const run = ++state.run;
  const timing = { firstImageMs: null, doneMs: null, requests: [] };
  window.playground.timings.push(timing);
  const results = $("results");
  results.dataset.state = "loading";
  delete results.dataset.firstImageMs;
  showError([]);
  $("generate").disabled = true;
  const cells = layout(request);
  const seen = new Set();

  const one = async (side) => {
    const { policies, ...fields } = request;
    const body = { ...fields, policy: policies[side] };
    const answer = await api("v1/generate", body);
    if (run !== state.run) return null;
    timing.requests[side] = { policy: body.policy, clientMs: answer.ms, status: answer.status };
    if (!answer.ok) {
      renderFailure(cells, side, answer);
      return answer;
    }
    timing.requests[side].serviceMs = answer.body.timings.total_ms;
    await renderAnswer(cells, side, answer, request, seen, () => {
      if (timing.firstImageMs === null) {
        timing.firstImageMs = performance.now() - clicked;
        results.dataset.firstImageMs = timing.firstImageMs.toFixed(1);
      }
    });
    return answer;
  };

  const answers = await Promise.all([one(0), one(1)]);
  if (run !== state.run) return;
  timing.doneMs = performance.now() - clicked;
  $("generate").disabled = false;
  const failed = answers.map((a, side) => [a, side]).filter(([a]) => a && !a.ok);
  if (failed.some(([a]) => a.status === 401)) {
    askForKey("The service requires an API key for this. Enter it above and generate again.");
  } else if (failed.length) {
    showError(
      failed.map(([a, side]) => ({ title: `${"AB"[side]} (${request.policies[side]})`, ...describe(a) })),
    );
  }
  results.dataset.state = failed.length ? "error" : "done";
}

function renderFailure(cells, side, answer) {
  const head = cells.heads[side];
  const { summary, details } = describe(answer);
  head.replaceChildren(el("h2", {}, head.querySelector("h2").textContent));
  head.append(el("p", { class: "error-text" }, summary));
  for (const d of details) head.append(el("p", { class: "error-text" }, d));
  for (const cell of cells.samples[side]) {
    cell.classList.remove("pending");
    cell.replaceChildren(el("p", { class: "muted" }, "no sample: the request failed"));
  }
}

async function renderAnswer(cells, side, answer, request, seen, onImage) {
  const data = answer.body;
  const head = cells.heads[side];
  const t = data.timings;
  const title = data.policy === data.requested_policy ? data.policy : `${data.requested_policy} → ${data.policy}`;
  head.replaceChildren(el("h2", {}, `${"AB"[side]}: ${title}`));
  if (data.degraded) head.append(el("p", { class: "warn" }, "degraded: no learned policy loaded"));
  head.append(
    el(
      "p",
      { class: "latency" },
      `Latency ${answer.ms.toFixed(0)} ms in the browser · ${t.total_ms.toFixed(0)} ms in the ` +
        `service (sampler ${t.sampler_ms.toFixed(0)} ms, ${t.batch_samples} samples in its run)`,
    ),
  );
  const ref = referenceRmse(state.info, data.policy, data.budget);
  head.append(
    el(
      "p",
      { class: "rmse" },
      ref
        ? `Reference RMSE ${ref.rmse.toPrecision(3)} (evaluation mean at budget ${data.budget}, ` +
            `mean NFE ${Number(ref.nfe).toFixed(1)})`
        : `Reference RMSE: not known (no evaluation figure for ${data.policy} at budget ${data.budget})`,
    ),
  );

  const decoded = [];
  data.samples.forEach((sample, i) => {
    const cell = cells.samples[side][i];
    cell.classList.remove("pending");
    cell.replaceChildren();
    const label = sample.label < 0 ? "no class" : `class ${sample.label}`;
    const figure = el("figure");
    const img = el("img", {
      alt: `${"AB"[side]}: ${data.policy}, seed ${sample.seed}, ${label}`,
      width: "128",
      height: "128",
    });
    img.src = `data:image/png;base64,${sample.png_base64}`;
    figure.append(img);
    figure.append(
      el("figcaption", {}, `${"AB"[side]} · seed ${sample.seed} · ${label} · NFE ${sample.nfe} of ${data.budget}`),
    );
    cell.append(figure);
    decoded.push(img.decode().then(onImage, () => {
      cell.append(el("p", { class: "error-text" }, "the image did not decode"));
    }));
    for (const step of sample.schedule) seen.add(step.expert);
    cell.append(chart(sample, data.budget));
    const confidence = sample.schedule.map((s) => s.confidence);
    cell.append(
      el(
        "p",
        { class: "confidence" },
        confidence.some((c) => typeof c === "number")
          ? `Router confidence per step: ${confidence.map((c) => (typeof c === "number" ? c.toFixed(2) : "–")).join(", ")}`
          : "Router confidence: none (a fixed schedule, no router)",
      ),
    );
    cell.append(el("p", { class: "explanation" }, sample.explanation));
  });
  legend(seen);
  await Promise.all(decoded);
}

function legend(experts) {
  const box = $("legend");
  box.replaceChildren();
  for (const name of [...experts].sort()) {
    const item = el("span", { class: "legend-item" });
    const swatch = el("svg:svg", { width: "12", height: "12", "aria-hidden": "true" });
    swatch.append(el("svg:rect", { width: "12", height: "12", rx: "2", fill: expertColour(name) }));
    item.append(swatch, name);
    box.append(item);
  }
}

// --- the schedule chart -------------------------------------------------------------------------

// One sample's schedule: sigma (log axis) against the NFE spent, each step a mark and a segment
// coloured by its expert; below, the router's confidence per step and the budget's NFE, used
// (coloured by the step that used each) and left over.
function chart(sample, budget) {
  const W = 320, L = 40, R = 8, T = 8, H = 96, CT = 116, CH = 24, BT = 154, BH = 12;
  const steps = sample.schedule;
  if (!steps.length) return el("p", { class: "muted" }, "no steps taken");
  const x = (nfe) => L + ((W - L - R) * nfe) / Math.max(budget, 1);
  const sigmas = steps.flatMap((s) => [s.sigma, s.sigma_next]).filter((s) => s > 0);
  const lo = Math.floor(Math.log10(Math.min(...sigmas)));
  const hi = Math.max(Math.ceil(Math.log10(Math.max(...sigmas))), lo + 1);
  const y = (sigma) => T + (H * (hi - Math.log10(sigma))) / (hi - lo);
  const svg = el("svg:svg", {
    class: "chart",
    viewBox: `0 0 ${W} 186`,
    role: "img",
    "aria-label": `schedule of seed ${sample.seed}: ${steps.length} steps, ${sample.nfe} of ${budget} NFE`,
  });
  // axes: a grid line and a label per decade of sigma, NFE ticks along the bottom
  for (let d = lo; d <= hi; d++) {
    svg.append(el("svg:line", { x1: L, x2: W - R, y1: y(10 ** d), y2: y(10 ** d), class: "grid" }));
    svg.append(el("svg:text", { x: L - 4, y: y(10 ** d) + 3, class: "tick", "text-anchor": "end" }, `1e${d}`));
  }
  svg.append(el("svg:text", { x: 2, y: T + H / 2, class: "axis" }, "σ"));
  if (sample.nfe < budget) {
    svg.append(el("svg:rect", { x: x(sample.nfe), y: T, width: x(budget) - x(sample.nfe), height: H, class: "unused" }));
  }
  let before = 0;
  steps.forEach((step, i) => {
    const colour = expertColour(step.expert);
    const x0 = x(before), x1 = x(step.nfe);
    const y1 = step.sigma_next > 0 ? y(step.sigma_next) : T + H;
    svg.append(el("svg:line", {
      x1: x0, y1: y(step.sigma), x2: x1, y2: y1, stroke: colour, class: step.sigma_next > 0 ? "seg" : "seg last",
    }));
    const mark = el("svg:circle", { cx: x0, cy: y(step.sigma), r: 4, fill: colour, class: "step", "data-expert": step.expert });
    const conf = typeof step.confidence === "number" ? `, confidence ${step.confidence.toFixed(2)}` : "";
    mark.append(el("svg:title", {}, `step ${i + 1}: ${step.expert}, sigma ${step.sigma.toPrecision(3)} → ${step.sigma_next.toPrecision(3)}, NFE ${step.nfe}${conf}`));
    svg.append(mark);
    // the router's confidence for this step, a bar of height CH at 1
    if (typeof step.confidence === "number") {
      const h = CH * Math.min(Math.max(step.confidence, 0), 1);
      svg.append(el("svg:rect", { x: x0 + 1, y: CT + CH - h, width: Math.max(x1 - x0 - 2, 2), height: h, fill: colour, class: "conf" }));
    }
    for (let k = before; k < step.nfe; k++) {
      svg.append(el("svg:rect", { x: x(k) + 1, y: BT, width: x(k + 1) - x(k) - 2, height: BH, fill: colour, class: "nfe used" }));
    }
    before = step.nfe;
  });
  for (let k = sample.nfe; k < budget; k++) {
    svg.append(el("svg:rect", { x: x(k) + 1, y: BT, width: x(k + 1) - x(k) - 2, height: BH, class: "nfe free" }));
  }
  svg.append(el("svg:line", { x1: L, x2: W - R, y1: CT + CH, y2: CT + CH, class: "grid" }));
  const hasRouter = steps.some((s) => typeof s.confidence === "number");
  svg.append(el("svg:text", { x: L - 4, y: CT + CH / 2 + 3, class: "tick", "text-anchor": "end" }, "conf."));
  if (!hasRouter) svg.append(el("svg:text", { x: L + 4, y: CT + CH - 4, class: "tick" }, "no router"));
  svg.append(el("svg:text", { x: L - 4, y: BT + BH - 2, class: "tick", "text-anchor": "end" }, "NFE"));
  svg.append(el("svg:text", { x: W - R, y: BT + BH + 16, class: "axis", "text-anchor": "end" }, `${sample.nfe} of ${budget} NFE used`));
  return svg;
}

// --- start ------------------------------------------------------------------------------------

function newSeed() {
  $("seed").value = String(Math.floor(Math.random() * 1e9));
}

function useKey() {
  state.key = $("api-key").value.trim();
  if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
  else sessionStorage.removeItem(KEY_STORE);
  loadPolicy();
}

document.addEventListener("DOMContentLoaded", () => {
  $("controls").addEventListener("submit", generate);
  $("new-seed").addEventListener("click", newSeed);
  $("use-key").addEventListener("click", useKey);
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      useKey();
    }
  });
  $("api-key").value = state.key;
  newSeed();
  loadPolicy();
});
