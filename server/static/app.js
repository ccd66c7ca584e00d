// The psearch web page: choose a query, mark the person, search, see the matches; add images to
// the gallery and see its counts. Plain JavaScript talking to the service's own API.
"use strict";

const API_KEY_HEADER = "X-API-Key"; // server/dependencies.py
const API_KEY_STORAGE = "psearch.apiKey";
const THUMB_HEIGHT = 160; // CSS pixels of a match's thumbnail
const CROP_MARGIN = 0.25; // context shown around a matched person, as a fraction of its box
const MIN_DRAWN_SIDE = 3; // image pixels: a shorter drag is a click, not a box
const MAX_PREVIEW_HEIGHT = 420; // CSS pixels
const MAX_PREVIEW_UPSCALE = 4; // small crops are enlarged to be drawn on, but not without end

const $ = (id) => document.getElementById(id);
const QUERY_HINT = $("query-hint").textContent.trim(); // what the page says before a choice

// ---------------------------------------------------------------------------------------------
// Talking to the API

/** An error answer of the API: {"error": {"code", "message"}}, or what a failed request said. */
class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** fetch() with the API key; resolves to the response when it is a success, else throws. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  const key = $("api-key").value.trim();
  if (key) headers.set(API_KEY_HEADER, key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new ApiError(0, "unreachable", `the service cannot be reached (${error.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  const retryAfter = response.headers.get("Retry-After");
  let code = response.statusText.toLowerCase().replaceAll(" ", "_") || "error";
  let message = `the service answered HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch {
    // Not JSON (a proxy's error page): the status is all there is to say.
  }
  return new ApiError(response.status, code, message, retryAfter);
}

/** Show an error in one of the page's alert boxes, in words, with its status and code. */
function showError(box, what, error) {
  box.replaceChildren();
  const title = document.createElement("strong");
  title.textContent = `${what}:`;
  const detail = document.createElement("span");
  detail.className = "error-message";
  detail.textContent = error.message;
  box.append(title, " ", detail);
  if (error instanceof ApiError && error.status) {
    const code = document.createElement("span");
    code.className = "error-code";
    code.textContent = `HTTP ${error.status} · ${error.code}`;
    box.append(code);
  }
  if (error.retryAfter) box.append(` Try again in ${error.retryAfter} s.`);
  box.hidden = false;
}

function clearError(box) {
  box.hidden = true;
  box.replaceChildren();
}

// ---------------------------------------------------------------------------------------------
// The query image and its box

const query = {
  bitmap: null, // the decoded query image (upright, as the service sees it)
  box: null, // [x1, y1, x2, y2] in image pixels, or null: the whole image
  searchedBox: null, // the detected person the last search used instead of the box, if any
  dragStart: null, // where a drag began, in image pixels
};

async function chooseQuery() {
  const file = $("query-file").files[0];
  query.bitmap = null;
  setBox(null);
  hideQuery();
  $("query-hint").textContent = QUERY_HINT;
  if (!file) return;
  try {
    query.bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    $("query-hint").textContent =
      "The browser cannot show this file; it can still be searched with a typed box.";
    return;
  }
  $("query-hint").textContent =
    `${query.bitmap.width} × ${query.bitmap.height} pixels. ` +
    "Drag on the image to mark the person, or search with the whole image.";
  drawQuery();
}

function hideQuery() {
  const canvas = $("query-canvas");
  canvas.width = canvas.height = 0;
  canvas.style.width = canvas.style.height = "";
}

/** Draw the query image at the size the page has for it, sharp on high-density screens. */
function drawQuery() {
  const canvas = $("query-canvas");
  const image = query.bitmap;
  if (!image) return;
  const available = $("query-preview").clientWidth;
  const scale = Math.min(
    available / image.width,
    MAX_PREVIEW_HEIGHT / image.height,
    MAX_PREVIEW_UPSCALE,
  );
  const width = Math.max(1, Math.floor(image.width * scale));
  const height = Math.max(1, Math.floor(image.height * scale));
  const density = window.devicePixelRatio || 1;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  canvas.width = Math.round(width * density);
  canvas.height = Math.round(height * density);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = scale < 1; // enlarged small crops stay crisp
  context.drawImage(image, 0, 0, canvas.width, canvas.height);
  const scaled = (box) => box.map((value) => (value * canvas.width) / image.width);
  if (query.box) dimOutside(context, scaled(query.box));
  if (query.searchedBox) strokeBox(context, scaled(query.searchedBox), 3 * density, [6 * density]);
  if (query.box) strokeBox(context, scaled(query.box), 3 * density);
}

/** Darken the image around a box, so that the person in it stands out on any image. */
function dimOutside(context, [x1, y1, x2, y2]) {
  context.save();
  context.fillStyle = "rgba(0, 0, 0, 0.45)";
  context.beginPath();
  context.rect(0, 0, context.canvas.width, context.canvas.height);
  context.rect(x1, y1, x2 - x1, y2 - y1);
  context.fill("evenodd");
  context.restore();
}

/** A box outlined in yellow on black, visible on light and dark images; dashed if asked. */
function strokeBox(context, [x1, y1, x2, y2], lineWidth, dashes = []) {
  context.setLineDash(dashes);
  context.lineWidth = lineWidth;
  context.strokeStyle = "#000";
  context.strokeRect(x1, y1, x2 - x1, y2 - y1);
  context.lineWidth = lineWidth / 2;
  context.strokeStyle = "#ffd400";
  context.strokeRect(x1, y1, x2 - x1, y2 - y1);
}

/** The pointer's position in image pixels, kept inside the image. */
function imagePoint(event) {
  const rect = $("query-canvas").getBoundingClientRect();
  const { width, height } = query.bitmap;
  const x = ((event.clientX - rect.left) / rect.width) * width;
  const y = ((event.clientY - rect.top) / rect.height) * height;
  return [clamp(Math.round(x), 0, width), clamp(Math.round(y), 0, height)];
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function boxBetween([ax, ay], [bx, by]) {
  return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
}

function startDrag(event) {
  if (!query.bitmap || event.button !== 0) return;
  event.preventDefault();
  event.currentTarget.setPointerCapture(event.pointerId);
  query.dragStart = imagePoint(event);
}

function moveDrag(event) {
  if (!query.dragStart) return;
  query.box = boxBetween(query.dragStart, imagePoint(event));
  drawQuery();
}

function endDrag(event) {
  if (!query.dragStart) return;
  const box = boxBetween(query.dragStart, imagePoint(event));
  query.dragStart = null;
  const big = box[2] - box[0] >= MIN_DRAWN_SIDE && box[3] - box[1] >= MIN_DRAWN_SIDE;
  setBox(big ? box : null);
  $("box").value = big ? box.join(",") : "";
}

function setBox(box) {
  query.box = box;
  query.searchedBox = null;
  if (box === null) $("box").value = "";
  $("box-note").textContent = "";
  drawQuery();
}

/** A typed box is drawn when it reads as one; the service has the last word (it answers 422). */
function typeBox() {
  const text = $("box").value.trim();
  query.box = null;
  query.searchedBox = null;
  $("box-note").textContent = "";
  if (text) {
    const numbers = text.replace(/^[[(]|[\])]$/g, "").split(",").map(Number);
    const valid =
      numbers.length === 4 &&
      numbers.every(Number.isFinite) &&
      numbers[2] > numbers[0] &&
      numbers[3] > numbers[1];
    if (valid) query.box = numbers;
    else $("box-note").textContent = "Not a box: four numbers x1,y1,x2,y2, x2 > x1, y2 > y1.";
  }
  drawQuery();
}

// ---------------------------------------------------------------------------------------------
// Searching and showing the matches

async function search(event) {
  event.preventDefault();
  const errorBox = $("search-error");
  clearError(errorBox);
  const form = $("search-form");
  const file = $("query-file").files[0];
  if (!file) {
    showError(errorBox, "No query", new Error("Choose a query image first."));
    return;
  }
  if (!form.reportValidity()) return;
  const body = new FormData();
  body.append("image", file);
  const box = $("box").value.trim();
  if (box) body.append("box", box);
  body.append("top_k", $("top-k").value);
  const minSimilarity = $("min-similarity").value.trim();
  if (minSimilarity) body.append("min_similarity", minSimilarity);
  for (const camera of splitList($("cameras").value)) body.append("cameras", camera);

  $("search-status").textContent = "Searching…";
  $("hits").replaceChildren();
  await busy($("search-button"), async () => {
    try {
      const result = await (await api("/v1/search", { method: "POST", body })).json();
      showHits(result);
    } catch (error) {
      $("search-status").textContent = "";
      showError(errorBox, "Search failed", error);
    }
  });
}

function counted(count, one, many = `${one}s`) {
  return `${count} ${count === 1 ? one : many}`;
}

function splitList(text) {
  return text
    .split(",")
    .map((item) => item.trim())
    .filter(Boolean);
}

async function busy(button, work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

function showHits({ query: used, hits, timings }) {
  const found = counted(hits.length, "match", "matches");
  $("search-status").textContent =
    `${found} in ${Math.round(timings.total_ms)} ms ${searchedFor(used)}.` +
    (hits.length ? "" : " The gallery may be empty, or the filters leave nothing.");
  // A model that cannot embed a given box searched for a detected person: show which one.
  query.searchedBox = used.method === "box" ? null : used.box;
  drawQuery();
  const images = new Map(); // image id -> promise of its bitmap: one download per image
  $("hits").replaceChildren(...hits.map((hit, rank) => hitItem(hit, rank + 1, images)));
}

function searchedFor(used) {
  const pixels = (box) => box.map((value) => Math.round(value)).join(",");
  if (used.method === "box") return `for the box ${pixels(used.box)}`;
  return (
    `for the detected person at ${pixels(used.box)} (dashed), the nearest to the box asked ` +
    `for, ${pixels(used.requested_box)} (IoU ${fixed(used.iou, 2)})`
  );
}

function hitItem(hit, rank, images) {
  const item = document.createElement("li");
  item.className = "hit";
  const canvas = document.createElement("canvas");
  canvas.className = "thumb";
  canvas.setAttribute("role", "img");
  const name = `Match ${rank}: person ${hit.person_id} in image ${hit.image_id}`;
  canvas.setAttribute("aria-label", name);
  canvas.dataset.state = "loading";
  item.append(canvas, details(hit, rank));
  if (!images.has(hit.image_id)) images.set(hit.image_id, galleryImage(hit.image_id));
  images
    .get(hit.image_id)
    .then((bitmap) => drawThumb(canvas, bitmap, hit.box))
    .catch((error) => {
      canvas.dataset.state = "failed";
      canvas.setAttribute("aria-label", `Match ${rank}: image unavailable (${error.message})`);
      item.classList.add("unavailable");
      item.title = `The image could not be shown: ${error.message}`;
    });
  return item;
}

async function galleryImage(imageId) {
  const response = await api(`/v1/gallery/images/${imageId}/file`);
  return createImageBitmap(await response.blob(), { imageOrientation: "from-image" });
}

function details(hit, rank) {
  const list = document.createElement("dl");
  const rows = [
    ["Rank", `#${rank}`, "rank"],
    ["Similarity", fixed(hit.similarity, 3), "similarity"],
    ["Detection", fixed(hit.det_score, 2), "det-score"],
    ["Camera", hit.camera ?? "unknown", "camera"],
    ["Image", hit.uri ? `${hit.image_id} · ${hit.uri}` : String(hit.image_id), "image"],
  ];
  for (const [term, value, name] of rows) {
    const row = document.createElement("div");
    row.className = name;
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.title = value; // the whole of a long file name
    row.append(dt, dd);
    list.append(row);
  }
  return list;
}

function fixed(value, digits) {
  return Number(value).toFixed(digits);
}

/** The person's box with some context around it, enlarged to the thumbnail height. */
function drawThumb(canvas, image, [x1, y1, x2, y2]) {
  const marginX = (x2 - x1) * CROP_MARGIN;
  const marginY = (y2 - y1) * CROP_MARGIN;
  const left = clamp(x1 - marginX, 0, image.width);
  const top = clamp(y1 - marginY, 0, image.height);
  const right = clamp(x2 + marginX, left + 1, image.width);
  const bottom = clamp(y2 + marginY, top + 1, image.height);
  const density = window.devicePixelRatio || 1;
  const scale = (THUMB_HEIGHT * density) / (bottom - top);
  canvas.width = Math.max(1, Math.round((right - left) * scale));
  canvas.height = Math.round(THUMB_HEIGHT * density);
  canvas.style.width = `${canvas.width / density}px`;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = scale < 1;
  const [width, height] = [right - left, bottom - top];
  context.drawImage(image, left, top, width, height, 0, 0, canvas.width, canvas.height);
  const inCrop = [x1 - left, y1 - top, x2 - left, y2 - top].map((value) => value * scale);
  dimOutside(context, inCrop);
  strokeBox(context, inCrop, 3 * density);
  canvas.dataset.state = "drawn";
}

// ---------------------------------------------------------------------------------------------
// The gallery: counts, and adding images

// Each refresh is numbered: only the latest one shows its answers (typing a key while the
// previous refresh is still under way must not leave the older answer on screen).
let galleryRefreshes = 0;

async function refreshGallery() {
  const refresh = ++galleryRefreshes;
  const [ready, stats] = await Promise.allSettled([
    api("/readyz").then((response) => response.json()),
    api("/v1/gallery/stats").then((response) => response.json()),
  ]);
  if (refresh !== galleryRefreshes) return;
  showServiceStatus(ready);
  showStats(stats);
}

function showServiceStatus({ status, value: ready, reason: error }) {
  const line = $("service-status");
  const isReady = status === "fulfilled";
  line.textContent = isReady
    ? `Ready: ${ready.model.name} on ${ready.model.backend} (${ready.model.device})`
    : `Not ready: ${error.message}`;
  line.dataset.state = isReady ? "ready" : "not-ready";
}

function showStats({ status, value: stats, reason: error }) {
  const errorBox = $("gallery-error");
  clearError(errorBox);
  const shown = {
    "stat-images": stats?.num_images,
    "stat-persons": stats?.num_persons,
    "stat-index": stats && `${stats.index_type}, ${stats.dim}-d`,
    "stat-model": stats?.fingerprint.split(":").pop().slice(0, 16),
  };
  for (const [id, value] of Object.entries(shown)) $(id).textContent = value ?? "–";
  $("stat-model").title = stats ? `Fingerprint of the gallery's model: ${stats.fingerprint}` : "";
  if (status === "rejected") showError(errorBox, "Gallery counts unavailable", error);
}

async function addImages(event) {
  event.preventDefault();
  const errorBox = $("add-error");
  clearError(errorBox);
  const files = [...$("add-files").files];
  if (!files.length) {
    showError(errorBox, "Nothing to add", new Error("Choose one or more images first."));
    return;
  }
  const body = new FormData();
  for (const file of files) body.append("images", file);
  const camera = $("add-camera").value.trim();
  if (camera) body.append("cameras", camera);

  $("add-status").textContent = `Adding ${counted(files.length, "image")}…`;
  await busy($("add-button"), async () => {
    try {
      const result = await (await api("/v1/gallery/images", { method: "POST", body })).json();
      showAdded(result);
      $("add-files").value = "";
      await refreshGallery();
    } catch (error) {
      $("add-status").textContent = "";
      showError(errorBox, "Adding failed", error);
    }
  });
}

function showAdded({ images, timings }) {
  const added = images.filter((image) => image.added).length;
  const already = images.length - added;
  $("add-status").textContent =
    `${added} added, ${already} already there, in ${Math.round(timings.total_ms)} ms.`;
  $("added").replaceChildren(
    ...images.map((image) => {
      const item = document.createElement("li");
      const name = image.filename ?? `image ${image.image_id}`;
      item.textContent = image.added
        ? `${name}: image ${image.image_id}, ${counted(image.num_persons, "person")}`
        : `${name}: already in the gallery (image ${image.image_id})`;
      return item;
    }),
  );
}

// ---------------------------------------------------------------------------------------------
// Wiring

function rememberApiKey() {
  sessionStorage.setItem(API_KEY_STORAGE, $("api-key").value);
  refreshGallery();
}

function start() {
  $("api-key").value = sessionStorage.getItem(API_KEY_STORAGE) ?? "";
  $("api-key").addEventListener("change", rememberApiKey);
  $("query-file").addEventListener("change", chooseQuery);
  const canvas = $("query-canvas");
  canvas.addEventListener("pointerdown", startDrag);
  canvas.addEventListener("pointermove", moveDrag);
  canvas.addEventListener("pointerup", endDrag);
  canvas.addEventListener("pointercancel", () => {
    query.dragStart = null;
  });
  $("box").addEventListener("input", typeBox);
  $("clear-box").addEventListener("click", () => setBox(null));
  $("search-form").addEventListener("submit", search);
  $("add-form").addEventListener("submit", addImages);
  $("refresh-stats").addEventListener("click", refreshGallery);
  new ResizeObserver(drawQuery).observe($("query-preview"));
  refreshGallery();
}

start();
