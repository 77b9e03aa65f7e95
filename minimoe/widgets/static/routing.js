// The routing explorer's front end: one ES module, used unchanged by JupyterLab (through
// anywidget) and by the self-contained page that RoutingExplorer.to_html writes.
//
// Python sends the router logits of every MoE layer once (model.get("data")); this module
// recomputes everything after them whenever a control moves, following minimoe/router.py
// and minimoe/balance.py step by step (the Python twin is minimoe/widgets/routing_data.py,
// and the tests check that both give the same numbers):
//
//   s   = softmax(u / T) or sigmoid(u / T)                       scores, UNBIASED
//   s'  = s + bias_scale * b                                     only to choose
//   groups: G_g = top1 + top2 of s' in g (V3) or max (V2); keep the topk_group best,
//           s'_i = -Infinity outside them (never 0: s' can be negative)
//   idx = TopK(s', k)                       ordered by decreasing s'
//   w   = s[idx] / (sum s[idx] + 1e-20) (if norm_topk_prob), times routed_scaling_factor
//   capacity C = ceil(cf * N * k / E); slots placed rank by rank, token by token (GShard)
//   load_e = kept slots of e / kept slots;  MaxVio = (max load - mean load) / mean load

const CONTROLS = ["layer", "top_k", "scoring_func", "temperature", "use_bias", "bias_scale",
                  "n_group", "topk_group", "capacity_factor"];

// ---------------------------------------------------------------- computation

function scoreRow(row, scoring, temperature) {
  const scaled = row.map((u) => u / temperature);
  if (scoring === "softmax") {
    const top = Math.max(...scaled);
    const exps = scaled.map((u) => Math.exp(u - top));
    const total = exps.reduce((a, b) => a + b, 0);
    return exps.map((x) => x / total);
  }
  return scaled.map((u) => 1 / (1 + Math.exp(-u)));
}

// indices of the k largest values, largest first (ties: lower index first)
function topIndices(values, k) {
  const order = values.map((_, i) => i);
  order.sort((a, b) => (values[b] - values[a]) || (a - b));
  return order.slice(0, k);
}

function selectExperts(scores, k, bias, nGroup, topkGroup, groupScore) {
  let choice = bias ? scores.map((s, i) => s + bias[i]) : scores.slice();
  if (nGroup > 1) {
    const perGroup = choice.length / nGroup;
    const groupScores = [];
    for (let g = 0; g < nGroup; g++) {
      const members = choice.slice(g * perGroup, (g + 1) * perGroup).sort((a, b) => b - a);
      groupScores.push(groupScore === "max" ? members[0] : members[0] + members[1]);
    }
    const keep = new Set(topIndices(groupScores, topkGroup));
    choice = choice.map((c, i) => (keep.has(Math.floor(i / perGroup)) ? c : -Infinity));
  }
  return topIndices(choice, k);
}

function capacityKeep(experts, weights, nExperts, capacityFactor) {
  const N = experts.length, k = N ? experts[0].length : 0;
  const capacity = Math.ceil(capacityFactor * N * k / nExperts);
  const keep = experts.map((row) => row.map(() => false));
  const rankOrder = weights.map((row) => row.map((_, j) => j)
    .sort((a, b) => (row[b] - row[a]) || (a - b)));   // stable: ties keep slot order
  const filled = new Array(nExperts).fill(0);
  for (let r = 0; r < k; r++) {
    for (let t = 0; t < N; t++) {
      const slot = rankOrder[t][r];
      const expert = experts[t][slot];
      keep[t][slot] = filled[expert] < capacity;
      filled[expert] += 1;
    }
  }
  return { keep, capacity };
}

export function routeLayer(logits, spec, s) {
  const N = logits.length, E = spec.n_experts, k = s.top_k;
  const bias = s.use_bias ? spec.bias.map((b) => b * s.bias_scale) : null;
  const experts = [], weights = [];
  for (const row of logits) {
    const scores = scoreRow(row, s.scoring_func, s.temperature);
    const idx = selectExperts(scores, k, bias, s.n_group, s.topk_group, spec.group_score);
    let w = idx.map((i) => scores[i]);
    if (spec.norm_topk_prob) {
      const total = w.reduce((a, b) => a + b, 0);
      w = w.map((x) => x / (total + 1e-20));
    }
    experts.push(idx);
    weights.push(w.map((x) => x * spec.routed_scaling_factor));
  }
  let kept = experts.map((row) => row.map(() => true)), capacity = null;
  if (s.capacity_factor > 0) ({ keep: kept, capacity } = capacityKeep(experts, weights, E, s.capacity_factor));
  const tokensPerExpert = new Array(E).fill(0);
  experts.forEach((row, t) => row.forEach((e, j) => { if (kept[t][j]) tokensPerExpert[e] += 1; }));
  const keptSlots = tokensPerExpert.reduce((a, b) => a + b, 0);
  const load = tokensPerExpert.map((c) => c / Math.max(keptSlots, 1));
  const meanLoad = load.reduce((a, b) => a + b, 0) / E;
  return {
    experts, weights, kept, capacity,
    tokens_per_expert: tokensPerExpert,
    load,
    max_vio: keptSlots > 0 ? (Math.max(...load) - meanLoad) / meanLoad : 0,
    dropped_slots: N * k - keptSlots,
    dropped_fraction: N * k > 0 ? 1 - keptSlots / (N * k) : 0,
  };
}

export function domainUsage(experts, nDomains, nExperts) {
  const perDomain = experts.length / nDomains;
  const counts = Array.from({ length: nDomains }, () => new Array(nExperts).fill(0));
  experts.forEach((row, t) => row.forEach((e) => { counts[Math.floor(t / perDomain)][e] += 1; }));
  const total = counts.flat().reduce((a, b) => a + b, 0);
  const pDomain = counts.map((row) => row.reduce((a, b) => a + b, 0) / total);
  const pExpert = counts[0].map((_, e) => counts.reduce((a, row) => a + row[e], 0) / total);
  let information = 0;
  counts.forEach((row, d) => row.forEach((c, e) => {
    if (c > 0) information += (c / total) * Math.log((c / total) / (pDomain[d] * pExpert[e]));
  }));
  const usage = counts.map((row) => {
    const rowTotal = Math.max(row.reduce((a, b) => a + b, 0), 1);
    return row.map((c) => c / rowTotal);
  });
  return { usage, information };
}

export function explore(payload, settings) {
  const layers = {}, usage = {}, information = {};
  for (const name of payload.layer_names) {
    const spec = payload.specs[name];
    layers[name] = routeLayer(payload.logits[name], spec, settings);
    if (payload.domains) {
      const routed = routeLayer(payload.domains.logits[name], spec, { ...settings, capacity_factor: 0 });
      const du = domainUsage(routed.experts, payload.domains.names.length, spec.n_experts);
      usage[name] = du.usage;
      information[name] = du.information;
    }
  }
  const result = { layer: settings.layer, settings: { ...settings }, layers, domains: null };
  if (payload.domains) {
    result.domains = { names: payload.domains.names, usage, mutual_information: information,
                       max_mutual_information: Math.log(payload.domains.names.length) };
  }
  return result;
}

// Keep the controls routable: topk_group within [ceil(k / experts per group), n_group].
export function fixSettings(s, nExperts) {
  const fixed = { ...s };
  fixed.top_k = Math.min(Math.max(1, fixed.top_k), nExperts);
  if (nExperts % fixed.n_group !== 0) fixed.n_group = 1;
  if (fixed.n_group > 1) {
    const perGroup = nExperts / fixed.n_group;
    const least = Math.ceil(fixed.top_k / perGroup);
    fixed.topk_group = Math.min(Math.max(fixed.topk_group, least, 1), fixed.n_group);
  }
  return fixed;
}

// ---------------------------------------------------------------- drawing

export function expertColour(e) {
  return `hsl(${Math.round((e * 137.508) % 360)}, 70%, ${e % 2 ? 62 : 48}%)`;
}

const STYLE = `
.mm-routing { font: 13px/1.4 system-ui, sans-serif; color: #222; max-width: 1100px; }
.mm-routing .mm-controls { display: flex; flex-wrap: wrap; gap: 6px 16px; padding: 8px;
  background: #f4f5f7; border-radius: 6px; margin-bottom: 8px; }
.mm-routing label { display: flex; align-items: center; gap: 6px; white-space: nowrap; }
.mm-routing input[type=range] { width: 110px; }
.mm-routing h4 { margin: 10px 0 4px; font-size: 13px; }
.mm-routing .mm-text { font-family: ui-monospace, monospace; line-height: 1.9; }
.mm-routing .mm-layer-row { display: flex; flex-wrap: wrap; align-items: baseline; }
.mm-routing .mm-layer-name { width: 80px; flex: none; color: #555; font-size: 11px; }
.mm-routing .mm-tok { padding: 1px 1px; margin: 0 1px 0 0; border-radius: 3px; color: #111;
  white-space: pre; }
.mm-routing .mm-tok.mm-current { outline: none; }
.mm-routing .mm-panels { display: flex; flex-wrap: wrap; gap: 16px; }
.mm-routing .mm-note { color: #444; font-size: 12px; }
.mm-routing .mm-bars { display: flex; align-items: flex-end; height: 120px; gap: 1px;
  border-bottom: 1px solid #888; position: relative; }
.mm-routing .mm-bar { flex: 1; min-width: 2px; }
.mm-routing .mm-mean { position: absolute; left: 0; right: 0; border-top: 1px dashed #000; }
`;

function slider(name, text, min, max, step, value, format) {
  const label = document.createElement("label");
  const input = Object.assign(document.createElement("input"),
                              { type: "range", min, max, step, value });
  input.dataset.control = name;
  const shown = document.createElement("span");
  shown.textContent = format(value);
  label.append(text, input, shown);
  return { label, input, shown };
}

function select(name, text, options, value) {
  const label = document.createElement("label");
  const input = document.createElement("select");
  input.dataset.control = name;
  for (const option of options) input.append(new Option(String(option), String(option)));
  input.value = String(value);
  label.append(text, input);
  return { label, input };
}

function heatmap(rows, columns, cell, colour, title, rowLabels = null) {
  const canvas = document.createElement("canvas");
  const margin = rowLabels ? 72 : 0;   // room for the row names on the left
  const width = margin + Math.max(160, Math.min(520, columns * 14));
  const height = Math.min(360, rows * (rowLabels ? 16 : 12) + 4);
  canvas.width = width; canvas.height = height;
  canvas.title = title;
  const ctx = canvas.getContext("2d");
  const w = (width - margin) / columns, h = (height - 4) / rows;
  for (let r = 0; r < rows; r++) {
    if (rowLabels) {
      ctx.fillStyle = "#333"; ctx.font = "11px sans-serif"; ctx.textBaseline = "middle";
      ctx.fillText(rowLabels[r], 2, r * h + h / 2);
    }
    for (let c = 0; c < columns; c++) {
      ctx.fillStyle = colour(cell(r, c));
      ctx.fillRect(margin + c * w, r * h, Math.ceil(w), Math.ceil(h));
    }
  }
  return canvas;
}

function viridisLike(x) {   // 0 -> dark blue, 1 -> yellow
  const v = Math.max(0, Math.min(1, x));
  return `hsl(${Math.round(250 - 190 * v)}, 70%, ${Math.round(18 + 55 * v)}%)`;
}

function tokenRow(name, tokens, layerResult, current) {
  const row = document.createElement("div");
  row.className = "mm-layer-row";
  const label = Object.assign(document.createElement("span"), { className: "mm-layer-name",
                                                                  textContent: name });
  row.append(label);
  tokens.forEach((token, t) => {
    const top1 = layerResult.experts[t][0];
    const span = Object.assign(document.createElement("span"), { className: "mm-tok",
                                                                   textContent: token });
    span.dataset.expert = top1;
    span.dataset.layer = name;
    span.style.backgroundColor = expertColour(top1);
    span.title = layerResult.experts[t].map((e, j) =>
      `e${e}: ${layerResult.weights[t][j].toFixed(3)}${layerResult.kept[t][j] ? "" : " (dropped)"}`).join("\n");
    if (current) span.classList.add("mm-current");
    row.append(span);
  });
  return row;
}

function loadPanel(result, E) {
  const panel = document.createElement("div");
  const bars = Object.assign(document.createElement("div"), { className: "mm-bars" });
  bars.style.width = `${Math.max(160, Math.min(520, E * 14))}px`;
  const top = Math.max(...result.load, 2 / E);
  result.load.forEach((load, e) => {
    const bar = Object.assign(document.createElement("div"), { className: "mm-bar" });
    bar.style.height = `${(100 * load) / top}%`;
    bar.style.backgroundColor = expertColour(e);
    bar.dataset.expert = e;
    bar.title = `expert ${e}: ${result.tokens_per_expert[e]} slots, load ${load.toFixed(3)}`;
    bars.append(bar);
  });
  const mean = Object.assign(document.createElement("div"), { className: "mm-mean" });
  mean.style.bottom = `${(100 / E) / top}%`;
  bars.append(mean);
  const total = result.experts.length * (result.experts[0] || []).length;
  const note = Object.assign(document.createElement("div"), { className: "mm-note mm-load-note" });
  note.textContent = `MaxVio ${result.max_vio.toFixed(3)} · dropped ${result.dropped_slots} of ` +
    `${total} slots` + (result.capacity === null ? " (no capacity limit)" : ` (capacity ${result.capacity} per expert)`) +
    " · dashed: the mean load 1/E";
  panel.append(Object.assign(document.createElement("h4"), { textContent: "Expert load (kept token-slots)" }),
               bars, note);
  return panel;
}

function buildControls(model, payload, E) {
  const divisors = [...Array(E).keys()].map((i) => i + 1)
    .filter((g) => E % g === 0 && (g === 1 || E / g >= 2) && g <= 64);
  const checkbox = (name, text) => {
    const label = document.createElement("label");
    const input = Object.assign(document.createElement("input"), { type: "checkbox", checked: model.get(name) });
    input.dataset.control = name;
    label.append(input, text);
    return { label, input };
  };
  return {
    layer: select("layer", "layer", payload.layer_names, model.get("layer")),
    top_k: slider("top_k", "top-k", 1, Math.min(E, 16), 1, model.get("top_k"), String),
    scoring_func: select("scoring_func", "scores", ["softmax", "sigmoid"], model.get("scoring_func")),
    temperature: slider("temperature", "temperature", 0.1, 4, 0.05, model.get("temperature"), (v) => Number(v).toFixed(2)),
    use_bias: checkbox("use_bias", "expert bias"),
    bias_scale: slider("bias_scale", "bias scale", 0, 5, 0.1, model.get("bias_scale"), (v) => Number(v).toFixed(1)),
    n_group: select("n_group", "n_group", divisors, model.get("n_group")),
    topk_group: slider("topk_group", "topk_group", 1, model.get("n_group"), 1, model.get("topk_group"), String),
    capacity_factor: slider("capacity_factor", "capacity factor", 0, 4, 0.25, model.get("capacity_factor"),
                            (v) => (Number(v) === 0 ? "off" : Number(v).toFixed(2))),
  };
}

function readControls(widgets) {
  const settings = {};
  for (const name of CONTROLS) {
    const input = widgets[name].input;
    settings[name] = name === "use_bias" ? input.checked
      : ["layer", "scoring_func"].includes(name) ? input.value : Number(input.value);
  }
  return settings;
}

function showControls(widgets, settings) {
  for (const name of CONTROLS) {
    const input = widgets[name].input;
    if (name === "use_bias") input.checked = settings.use_bias;
    else input.value = String(settings[name]);
    if (widgets[name].shown) widgets[name].shown.textContent =
      name === "capacity_factor" ? (settings[name] === 0 ? "off" : settings[name].toFixed(2))
        : name === "temperature" ? settings[name].toFixed(2)
          : name === "bias_scale" ? settings[name].toFixed(1) : String(settings[name]);
  }
  widgets.topk_group.input.max = String(settings.n_group);
  widgets.topk_group.input.disabled = settings.n_group === 1;
}

function weightPanel(layer, name, E) {
  const dense = layer.experts.map((row, t) => {   // (tokens, E): kept gate weights, 0 elsewhere
    const full = new Array(E).fill(0);
    row.forEach((e, j) => { full[e] = layer.kept[t][j] ? layer.weights[t][j] : 0; });
    return full;
  });
  const top = Math.max(...dense.flat(), 1e-12);
  const panel = document.createElement("div");
  panel.append(Object.assign(document.createElement("h4"),
    { textContent: `Gate weights, ${name} (row: token, column: expert; max ${top.toFixed(2)})` }),
    heatmap(dense.length, E, (r, c) => dense[r][c] / top, viridisLike, "gate weight / max"));
  return panel;
}

function domainPanel(domains, name, E) {
  const usage = domains.usage[name];
  const note = Object.assign(document.createElement("div"), { className: "mm-note mm-domain-note" });
  note.textContent = `I(domain; expert) = ${domains.mutual_information[name].toFixed(2)} nats of max ` +
    `ln ${domains.names.length} = ${domains.max_mutual_information.toFixed(2)} · a column per expert · ` +
    "colour: share of the domain's slots, 0 to 1";
  const panel = document.createElement("div");
  panel.append(Object.assign(document.createElement("h4"),
    { textContent: `Expert usage by domain of the bundled corpus, ${name}` }),
    heatmap(usage.length, E, (r, c) => usage[r][c], viridisLike, "share of the domain's slots", domains.names),
    note);
  return panel;
}

function drawResult(body, payload, result, E) {
  const name = result.layer;
  body.replaceChildren(Object.assign(document.createElement("h4"),
    { textContent: `${payload.model_name}: each token coloured by its top-1 expert, one row per MoE layer (hover: experts and gate weights)` }));
  const text = Object.assign(document.createElement("div"), { className: "mm-text" });
  for (const layerName of payload.layer_names) {
    text.append(tokenRow(layerName, payload.tokens, result.layers[layerName], layerName === name));
  }
  const panels = Object.assign(document.createElement("div"), { className: "mm-panels" });
  panels.append(weightPanel(result.layers[name], name, E), loadPanel(result.layers[name], E));
  if (result.domains) panels.append(domainPanel(result.domains, name, E));
  body.append(text, panels);
}

function render({ model, el }) {
  const payload = model.get("data");
  const E = payload.specs[payload.layer_names[0]].n_experts;
  const root = Object.assign(document.createElement("div"), { className: "mm-routing" });
  const controls = Object.assign(document.createElement("div"), { className: "mm-controls" });
  const body = document.createElement("div");
  const resultBox = Object.assign(document.createElement("pre"), { className: "mm-result", hidden: true });
  root.append(Object.assign(document.createElement("style"), { textContent: STYLE }), controls, body, resultBox);
  el.append(root);
  const widgets = buildControls(model, payload, E);
  for (const name of CONTROLS) controls.append(widgets[name].label);

  function draw() {
    const settings = fixSettings(Object.fromEntries(CONTROLS.map((c) => [c, model.get(c)])), E);
    showControls(widgets, settings);
    const result = explore(payload, settings);
    resultBox.textContent = JSON.stringify(result);   // the numbers on display, for tests and readers
    drawResult(body, payload, result, E);
  }
  let pending = false;   // one redraw for a burst of changes (several controls set at once)
  function scheduleDraw() {
    if (pending) return;
    pending = true;
    queueMicrotask(() => { pending = false; draw(); });
  }
  for (const name of CONTROLS) {
    widgets[name].input.addEventListener("input", () => {
      const settings = fixSettings(readControls(widgets), E);
      for (const c of CONTROLS) model.set(c, settings[c]);
      model.save_changes();
      scheduleDraw();
    });
    model.on(`change:${name}`, scheduleDraw);
  }
  draw();
}

export default { render };
