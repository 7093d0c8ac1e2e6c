// capsnet explore: draw an image of a class, watch its capsules. Talks to the JSON API of
// explore.py.
"use strict";

const PAD_SAMPLE = 56;  // the drawing is averaged down to 56x56 before it is sent
const NAMES_SHOWN = 12;  // class names listed in the heading of the drawing pad
const SLIDER_RANGE = 0.5;  // pose offsets -0.5 .. +0.5, as in the notebook
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

const state = {
  info: null,
  source: "drawing",  // "drawing" (the pad, centred by the server) or "sample" (a test image)
  sample: null,       // the test image shown on the pad, image_size x image_size
  hasInk: false,
  capsule: null,      // null: decode the winning capsule
  offsets: [],
  busy: false,        // a prediction is in flight
  dirty: false,       // something changed while it was
  updates: 0,
};

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showMessage(text, isError = false) {
  $("message").textContent = text;
  $("message").classList.toggle("error", isError);
}

// -- drawing pad ----------------------------------------------------------------------------

function padContext() {
  return $("pad").getContext("2d", {willReadFrequently: true});
}

function clearPad() {
  const ctx = padContext();
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, $("pad").width, $("pad").height);
  Object.assign(state, {source: "drawing", sample: null, hasInk: false});
  delete $("pad").dataset.label;
  resetChoice();
  clearResults();
  showMessage("Draw with the mouse or a finger.");
}

function padPoint(event) {
  const pad = $("pad");
  const rect = pad.getBoundingClientRect();
  return {x: (event.clientX - rect.left) * pad.width / rect.width,
          y: (event.clientY - rect.top) * pad.height / rect.height};
}

function strokeLine(from, to) {
  const ctx = padContext();
  Object.assign(ctx, {strokeStyle: "#fff", lineWidth: $("pad").width / 12,
                      lineCap: "round", lineJoin: "round"});
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
  state.hasInk = true;
  state.source = "drawing";
}

function setupPad() {
  const pad = $("pad");
  let last = null;
  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    if (state.source === "sample") resetChoice();  // drawing over a test image: a new image
    last = padPoint(event);
    strokeLine(last, last);
    requestPrediction();
  });
  pad.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const point = padPoint(event);
    strokeLine(last, point);
    last = point;
    requestPrediction();
  });
  const end = () => { if (last !== null) { last = null; requestPrediction(); } };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
}

// Average the pad's red channel down to PAD_SAMPLE x PAD_SAMPLE values in [0, 1].
function padImage() {
  const pad = $("pad");
  const pixels = padContext().getImageData(0, 0, pad.width, pad.height).data;
  const block = pad.width / PAD_SAMPLE;
  const rows = [];
  for (let r = 0; r < PAD_SAMPLE; r++) {
    const row = [];
    for (let c = 0; c < PAD_SAMPLE; c++) {
      let sum = 0;
      for (let y = r * block; y < (r + 1) * block; y++) {
        for (let x = c * block; x < (c + 1) * block; x++) sum += pixels[(y * pad.width + x) * 4];
      }
      row.push(Math.round(sum / (block * block * 255) * 1000) / 1000);
    }
    rows.push(row);
  }
  return rows;
}

function showSampleOnPad(image) {
  const pad = $("pad");
  const small = document.createElement("canvas");
  drawPicture(small, image);
  const ctx = padContext();
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, pad.width, pad.height);
}

async function loadSample() {
  $("sample").disabled = true;
  try {
    const sample = await api("/api/sample");
    showSampleOnPad(sample.image);
    Object.assign(state, {source: "sample", sample: sample.image, hasInk: true});
    resetChoice();
    $("pad").dataset.label = sample.label;
    showMessage(`Test image ${sample.index + 1} of ${sample.count}, label ${sample.label_name}.`);
    requestPrediction();
  } catch (error) {
    showMessage(`No test image: ${error.message}`, true);
  } finally {
    $("sample").disabled = false;
  }
}

// -- predictions ----------------------------------------------------------------------------

function requestBody() {
  const body = {capsule: state.capsule, offsets: state.offsets};
  if (state.source === "sample") return {...body, image: state.sample, preprocess: false};
  return {...body, image: padImage(), preprocess: true};
}

// At most one request in flight; changes made meanwhile are sent when it returns.
function requestPrediction() {
  if (!state.info || !state.hasInk) return;
  if (state.busy) { state.dirty = true; return; }
  setBusy(true);
  state.dirty = false;
  api("/api/predict", requestBody())
    .then(render)
    .catch((error) => showMessage(`Prediction failed: ${error.message}`, true))
    .finally(() => {
      setBusy(false);
      if (state.dirty) requestPrediction();
    });
}

function setBusy(busy) {
  state.busy = busy;
  document.body.dataset.busy = busy;
}

function render(result) {
  if (!state.hasInk) return;  // cleared while the request was in flight
  const name = state.info.class_names[result.capsule];
  $("prediction").textContent = result.none ? "none of these" : result.class_name;
  $("prediction").dataset.class = result.prediction;
  $("prediction").dataset.none = result.none;
  $("verdict").textContent = verdict(result);
  $("caps-panel").classList.toggle("none", result.none);
  $("capsule-name").textContent = name;
  $("coupling-name").textContent = name;
  $("follow").disabled = state.capsule === null;
  renderBars(result);
  drawPicture($("reconstruction"), result.reconstruction);
  drawPicture($("input"), result.input);
  renderCoupling(result.coupling);
  state.updates += 1;
  document.body.dataset.updates = state.updates;
}

// The longest capsule's length, and what it says: its class is there, or none is.
function verdict(result) {
  const length = result.lengths[result.prediction].toFixed(3);
  if (!result.none) return `capsule length ${length}`;
  return `No capsule reaches ${state.info.present}; the longest is ` +
         `${result.class_name}, ${length}.`;
}

function clearResults() {
  $("prediction").textContent = "–";
  $("verdict").textContent = "";
  $("caps-panel").classList.remove("none");
  delete $("prediction").dataset.none;
  for (const id of ["reconstruction", "input"]) {
    $(id).getContext("2d").clearRect(0, 0, $(id).width, $(id).height);
  }
  delete $("prediction").dataset.class;
  for (const bar of document.querySelectorAll(".bar")) {
    bar.classList.remove("winner", "chosen");
    bar.querySelector(".fill").style.width = "0";
    bar.querySelector(".value").textContent = "";
  }
}

// -- capsule lengths ------------------------------------------------------------------------

function buildBars() {
  const bars = $("bars");
  state.info.class_names.forEach((name, index) => {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.class = index;
    bar.title = `decode capsule ${name}`;
    bar.innerHTML = '<span class="name"></span><span class="track"><span class="fill">' +
                    '</span></span><span class="value"></span>';
    bar.querySelector(".name").textContent = name;
    bar.addEventListener("click", () => chooseCapsule(index));
    bars.append(bar);
  });
}

function renderBars(result) {
  for (const bar of document.querySelectorAll(".bar")) {
    const index = Number(bar.dataset.class);
    const length = result.lengths[index];
    bar.querySelector(".fill").style.width = `${Math.min(100, length * 100)}%`;
    bar.querySelector(".value").textContent = length.toFixed(3);
    bar.classList.toggle("winner", index === result.prediction);
    bar.classList.toggle("chosen", index === result.capsule);
  }
}

function chooseCapsule(index) {
  state.capsule = index;
  requestPrediction();
}

// A new image starts from its longest capsule with no pose offsets.
function resetChoice() {
  state.capsule = null;
  state.offsets.forEach((_, dim) => showOffset(dim, 0));
}

// -- pose sliders ---------------------------------------------------------------------------

function buildSliders() {
  const sliders = $("sliders");
  state.offsets = new Array(state.info.digit_dim).fill(0);
  state.offsets.forEach((_, dim) => {
    const label = document.createElement("label");
    label.className = "slider";
    label.innerHTML = `<span>d${dim}</span><input type="range" min="${-SLIDER_RANGE}" ` +
                      `max="${SLIDER_RANGE}" step="0.01" value="0"><output>0.00</output>`;
    const input = label.querySelector("input");
    input.dataset.dim = dim;
    input.addEventListener("input", () => setOffset(dim, Number(input.value)));
    sliders.append(label);
  });
}

function showOffset(dim, value) {
  state.offsets[dim] = value;
  const input = document.querySelector(`input[data-dim="${dim}"]`);
  input.value = value;
  input.nextElementSibling.textContent = value.toFixed(2);
}

function setOffset(dim, value) {
  showOffset(dim, value);
  requestPrediction();
}

function resetSliders() {
  state.offsets.forEach((_, dim) => showOffset(dim, 0));
  requestPrediction();
}

// -- pictures -------------------------------------------------------------------------------

// Draw an image of the API: rows of gray values, or channels of them (three: in colour;
// another number, smallNORB's stereo pairs: the first one in gray).
function drawPicture(canvas, image) {
  if (!Array.isArray(image[0][0])) drawGray(canvas, image);
  else if (image.length === 3) drawColour(canvas, image);
  else drawGray(canvas, image[0]);
}

function drawColour(canvas, [red, green, blue]) {
  canvas.height = red.length;
  canvas.width = red[0].length;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  const byte = (v) => Math.min(1, Math.max(0, v)) * 255;
  red.forEach((row, r) => row.forEach((value, c) => {
    image.data.set([byte(value), byte(green[r][c]), byte(blue[r][c]), 255],
                   (r * canvas.width + c) * 4);
  }));
  ctx.putImageData(image, 0, 0);
}

// Draw rows of values in [0, 1] as gray pixels (or through `colour`) on `canvas`.
function drawGray(canvas, rows, colour = (v) => [v * 255, v * 255, v * 255]) {
  canvas.height = rows.length;
  canvas.width = rows[0].length;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  rows.flat().forEach((value, i) => {
    image.data.set([...colour(Math.min(1, Math.max(0, value))), 255], i * 4);
  });
  ctx.putImageData(image, 0, 0);
}

function viridis(t) {
  const x = t * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  return VIRIDIS[i].map((a, k) => a + (VIRIDIS[i + 1][k] - a) * (x - i));
}

function normalise(rows, low, high) {
  const span = high - low || 1;
  return rows.map((row) => row.map((v) => (v - low) / span));
}

// coupling: maps x grid x grid. The mean tile has its own scale; the maps share one.
function renderCoupling(coupling) {
  const grid = coupling[0].length;
  const mean = Array.from({length: grid}, (_, r) => Array.from({length: grid}, (_, c) =>
    coupling.reduce((sum, map) => sum + map[r][c], 0) / coupling.length));
  const all = coupling.flat(2);
  const low = Math.min(...all), high = Math.max(...all);
  const meanValues = mean.flat();
  drawGray($("coupling-mean"),
           normalise(mean, Math.min(...meanValues), Math.max(...meanValues)), viridis);
  const tiles = document.querySelectorAll("#tiles canvas");
  coupling.forEach((map, m) => drawGray(tiles[m], normalise(map, low, high), viridis));
  $("scale").textContent = `${low.toFixed(3)} (dark) to ${high.toFixed(3)} (yellow)`;
}

function buildTiles() {
  const tiles = $("tiles");
  $("map-count").textContent = state.info.primary_maps;
  for (let m = 0; m < state.info.primary_maps; m++) {
    const figure = document.createElement("figure");
    figure.innerHTML = `<canvas class="pixels" title="map ${m}"></canvas>` +
                       `<figcaption>map ${m}</figcaption>`;
    tiles.append(figure);
  }
}

// -- start ----------------------------------------------------------------------------------

// The last part of a path: a data set folder by its name (a registered data set as it is).
const baseName = (path) => path.replace(/[\\/]+$/, "").split(/[\\/]/).pop();

// The model as given, the data set of the test images, the capsules.
function modelLine(info) {
  const model = `model ${info.checkpoint}` + (info.shipped ? " (shipped with capsnet)" : "");
  const data = info.dataset ? `test images from ${baseName(info.dataset)}` : "no test images";
  return [model, data, `${info.classes} classes`, `${info.primary_grid}×${info.primary_grid}×` +
          `${info.primary_maps} primary capsules`].join(" · ");
}

// "a digit" only for a model of MNIST-style digits named 0, 1, ...; else the class names.
function drawTitle(info) {
  const names = info.class_names;
  if (info.prepare === "mnist" && names.every((name, i) => name === String(i))) {
    return "Draw a digit";
  }
  const more = names.length > NAMES_SHOWN ? `, … (${names.length} classes)` : "";
  return `Draw one of: ${names.slice(0, NAMES_SHOWN).join(", ")}${more}`;
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (error) {
    showMessage(`Cannot reach the server: ${error.message}`, true);
    return;
  }
  const info = state.info;
  $("model-info").textContent = modelLine(info);
  $("model-info").title = info.dataset ? `test images: ${info.dataset}` : "";
  $("draw-title").textContent = drawTitle(info);
  $("dim-count").textContent = info.digit_dim;
  buildBars();
  buildSliders();
  buildTiles();
  setupPad();
  clearPad();
  $("clear").addEventListener("click", clearPad);
  $("sample").addEventListener("click", loadSample);
  $("reset").addEventListener("click", resetSliders);
  $("follow").addEventListener("click", () => chooseCapsule(null));
  document.body.dataset.ready = "true";
}

start();
