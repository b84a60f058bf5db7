// The review page: the status at the top, the inbox as a grid, corrections by key or click.
"use strict";
const PAGE = 60;
let images = [], selected = 0, changes = null, classes = [], total = 0, shown = PAGE;
let lastLabelled = null;  // the path of the last correction made here: what u takes back
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const answer = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(answer.error || response.statusText);
  if (answer.pending) throw new Error(answer.pending);  // 202: to be finished by the daemon
  return answer;
}

function toast(text) {
  const box = $("toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

function percent(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }

function showStatus(s) {
  const inbox = s.inbox || {};
  const parts = [
    s.running_pid ? (s.training ? "training" : "running") : "not running",
    `epoch ${s.epoch}/${s.epochs}`, `validation accuracy ${percent(s.validation_accuracy)}`,
    `data version ${s.data_version ?? "–"}`, `${s.images ?? "–"} training images`,
    `${s.review.listed} labelled in the inbox`, `backlog ${inbox.backlog ?? "–"}`,
    `errors ${s.review.errors}`];
  $("state").textContent = parts.join(" · ");
  const points = (s.curve || []).filter((e) => e.val_accuracy !== null && e.val_accuracy !== undefined);
  $("curve").innerHTML = points.length < 2 ? "" : `<polyline points="${points.map((e, i) =>
    `${(200 * i / (points.length - 1)).toFixed(1)},${(40 - 38 * e.val_accuracy).toFixed(1)}`).join(" ")}"/>`;
  $("notice").hidden = s.review.trains;
  $("notice").textContent = "Corrections are kept in the sidecars; training on them needs data.source: folder.";
  const known = new Set([...(s.classes || []), ...Object.keys(s.review.by_label)]);
  // the model's classes in its order, then the others: a digit keeps its class
  const order = (name) => { const i = (s.classes || []).indexOf(name); return i < 0 ? Infinity : i; };
  setClasses([...known].sort((a, b) => order(a) - order(b) || a.localeCompare(b)));
  if (s.review.changes !== changes) { changes = s.review.changes; loadImages(); }
}

function setClasses(list) {
  const merged = [...classes];
  for (const name of list) if (!merged.includes(name)) merged.push(name);
  if (merged.join("\n") === classes.join("\n")) return;
  classes = merged;
  $("classes").replaceChildren(...classes.map((name, i) => {
    const button = document.createElement("button");
    button.textContent = i < 9 ? `${i + 1} ${name}` : name;
    button.onclick = () => label(name);
    return button;
  }));
  const filter = $("filter"), chosen = filter.value;
  filter.replaceChildren(new Option("every class", ""), ...classes.map((name) => new Option(name, name)));
  filter.value = chosen;
}

async function loadImages() {
  const query = new URLSearchParams({sort: $("sort").value, offset: 0, limit: shown});
  if ($("filter").value) query.set("class", $("filter").value);
  const keep = images[selected] && images[selected].path;
  try {
    const answer = await api("/api/images?" + query);
    images = answer.images; total = answer.total;
  } catch (error) { toast(error.message); return; }
  const again = images.findIndex((image) => image.path === keep);
  selected = again >= 0 ? again : Math.min(selected, Math.max(0, images.length - 1));
  render();
}

function render() {
  $("grid").replaceChildren(...images.map((image, i) => {
    const card = document.createElement("figure");
    card.className = "card" + (i === selected ? " selected" : "") +
      (image.source === "person" ? " person" : "") + (image.error ? " error" : "");
    card.dataset.path = image.path;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = image.path;
    img.src = "/api/thumb?" + new URLSearchParams({path: image.path});
    const name = document.createElement("div");
    name.className = "label";
    name.textContent = image.error ? "error" : image.label;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = image.error ? image.error : `${percent(image.confidence)} · ${image.path}`;
    card.append(img, name, meta);
    card.onclick = () => { selected = i; render(); };
    return card;
  }));
  $("more").hidden = images.length >= total;
  $("count").textContent = `${images.length} of ${total}`;
  const card = $("grid").children[selected];
  if (card) card.scrollIntoView({block: "nearest"});
}

async function label(name) {
  const image = images[selected];
  if (!image) return;
  try {
    const record = await api("/api/label", {path: image.path, label: name});
    Object.assign(image, {label: record.label, source: record.source, confidence: record.confidence, error: null});
    toast(`${image.path}: ${record.label}` + (record.copy ? ` (training copy ${record.copy})` : ""));
    lastLabelled = image.path;
    setClasses([record.label]);
    selected = Math.min(selected + 1, images.length - 1);
    render();
  } catch (error) { toast(error.message); }
}

async function undo() {
  // the selected image's correction; else the last one made here (labelling moved on)
  let image = images[selected];
  if (image && image.source !== "person") {
    const last = images.findIndex((each) => each.path === lastLabelled && each.source === "person");
    if (last >= 0) { selected = last; image = images[last]; }
  }
  if (!image) return;
  try {
    const record = await api("/api/undo", {path: image.path});
    Object.assign(image, {label: record.label, source: record.source, confidence: record.confidence ?? null});
    toast(`${image.path}: correction taken back`);
    render();
  } catch (error) { toast(error.message); }
}

function move(by) {
  if (!images.length) return;
  selected = Math.max(0, Math.min(images.length - 1, selected + by));
  render();
}

document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const perRow = Math.max(1, Math.round($("grid").clientWidth / 160));
  const keys = {j: 1, ArrowRight: 1, k: -1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow};
  if (event.key in keys) { move(keys[event.key]); event.preventDefault(); }
  else if (/^[1-9]$/.test(event.key) && classes[+event.key - 1]) label(classes[+event.key - 1]);
  else if (event.key === "u") undo();
});

$("new-class").onsubmit = (event) => {
  event.preventDefault();
  const name = $("new-name").value.trim();
  if (!name) return;
  $("new-name").value = "";
  $("new-name").blur();
  label(name);
};
$("sort").onchange = $("filter").onchange = () => { selected = 0; loadImages(); };
$("more").onclick = () => { shown += PAGE; loadImages(); };

async function poll() {
  try { showStatus(await api("/api/status")); } catch (error) { $("state").textContent = error.message; }
  setTimeout(poll, 2000);
}
poll();
