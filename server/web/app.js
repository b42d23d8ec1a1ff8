const colors = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6"];
async function loadTasks() {
  const r = await fetch("/v1/tasks");
  const { tasks } = await r.json();
  const list = document.getElementById("tasks");
  list.replaceChildren(...tasks.map(t => {  // text nodes only: names and labels come from uploads
    const label = document.createElement("label"), box = document.createElement("input");
    box.type = "checkbox"; box.value = t.id; box.checked = true;
    label.append(box, ` ${t.id} (${t.method}, ${t.kind})`);
    return label;
  }));
}
async function detect() {
  const file = document.getElementById("file").files[0];
  if (!file) return;
  const ids = [...document.querySelectorAll("#tasks input:checked")].map(i => i.value);
  const img = document.getElementById("img");
  img.src = URL.createObjectURL(file);
  await img.decode();
  const form = new FormData();
  form.append("image", file);
  form.append("tasks", ids.join(","));
  const threshold = document.getElementById("threshold").value;
  const r = await fetch(`/v1/detect?score_threshold=${encodeURIComponent(threshold)}`, { method: "POST", body: form });
  const body = await r.json();
  const stage = document.getElementById("stage");
  stage.querySelectorAll(".box").forEach(b => b.remove());
  if (!r.ok) { document.getElementById("status").textContent = body.error.message; return; }
  const k = img.clientWidth / body.image.width;
  const found = body.results.flatMap((res, i) => res.detections.map(d => ({ res, i, d })));
  found.sort((a, b) => a.d.score - b.d.score);  // the surest box is drawn last, on top
  found.forEach(({ res, i, d }) => {
    const [x1, y1, x2, y2] = d.box.map(v => v * k);
    const el = document.createElement("div");
    el.className = "box";
    el.style.cssText = `left:${x1}px;top:${y1}px;width:${x2 - x1}px;height:${y2 - y1}px;border-color:${colors[i % 7]}`;
    const tag = document.createElement("span");
    tag.style.background = colors[i % 7];
    tag.textContent = `${res.task}: ${d.label} ${d.score.toFixed(2)}`;
    el.appendChild(tag);
    stage.appendChild(el);
  });
  document.getElementById("status").textContent =
    `${body.results.length} tasks, ${body.backbone_passes} backbone pass(es), ${body.timing_ms.total.toFixed(0)} ms`;
}
document.getElementById("file").addEventListener("change", detect);
document.getElementById("tasks").addEventListener("change", detect);
document.getElementById("threshold").addEventListener("change", detect);
loadTasks();
