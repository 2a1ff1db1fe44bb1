// ORCA dashboard: a thin client of the /v1 API.
//
// Safety rules this file keeps:
// - every string from the server reaches the page through textContent or a text node, never
//   innerHTML, so a dataset called "<img onerror=...>" stays text;
// - the API key lives in sessionStorage (this tab only) and travels only in the Authorization
//   header, never in a URL: the live event stream is read with fetch() streaming instead of
//   EventSource (which cannot send headers), and plots are fetched and shown as blob: URLs.
"use strict";

(function () {
  const KEY_STORAGE = "orca_api_key";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const MAX_EVENT_LINES = 200;

  const state = {
    datasets: [],
    jobs: new Map(),
    watchedJobId: null,
    stream: null, // AbortController of the live event stream
    poller: null, // interval that re-reads the watched job
    plotUrls: {}, // plot name -> blob: URL shown now
    timers: {},
  };

  const $ = (id) => document.getElementById(id);

  // -- small DOM helpers (text only) ----------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === "className") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, value) {
    $(id).textContent = value === null || value === undefined ? "" : String(value);
  }

  function formatBytes(bytes) {
    if (typeof bytes !== "number") return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return (unit === 0 ? value : value.toFixed(1)) + " " + units[unit];
  }

  function formatTime(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return isNaN(date) ? String(iso) : date.toLocaleString();
  }

  function formatSeconds(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    if (seconds < 60) return Math.round(seconds) + " s";
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " min " + Math.round(seconds % 60) + " s";
    return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
  }

  function formatNumber(value) {
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 1000 || Math.abs(value) < 0.001 ? value.toExponential(3) : value.toFixed(4);
  }

  function formatMetrics(metrics) {
    if (!metrics || typeof metrics !== "object") return "";
    return Object.entries(metrics)
      .filter(([, value]) => typeof value === "number")
      .map(([name, value]) => name + " " + formatNumber(value))
      .join(" · ");
  }

  function showBanner(message) {
    const banner = $("banner");
    banner.textContent = message || "";
    banner.hidden = !message;
  }

  // -- API access --------------------------------------------------------------------------------

  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      const where = error.param ? " (" + error.param + ")" : "";
      super((error.message || "request failed with HTTP " + status) + where);
      this.status = status;
      this.code = error.code || "http_" + status;
      this.body = body;
    }
  }

  async function api(path, options) {
    const key = apiKey();
    if (!key) throw new ApiError(401, { error: { message: "paste an API key first" } });
    const init = Object.assign({}, options || {});
    init.headers = Object.assign({ Authorization: "Bearer " + key }, init.headers || {});
    const response = await fetch(path, init);
    if (init.raw) {
      if (!response.ok) throw new ApiError(response.status, await readJson(response));
      return response;
    }
    const body = await readJson(response);
    if (!response.ok) {
      if (response.status === 401) markKey(false, "the key was refused: " + new ApiError(401, body).message);
      throw new ApiError(response.status, body);
    }
    return body;
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (_error) {
      return null;
    }
  }

  function markKey(ok, message) {
    const status = $("key-status");
    status.textContent = message;
    status.className = ok ? "ok" : "error";
  }

  // -- key ---------------------------------------------------------------------------------------

  async function useKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    await connect();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_STORAGE);
    stopStream();
    markKey(false, "key forgotten");
    for (const id of ["datasets-table", "jobs-table", "models-table"]) {
      document.querySelector("#" + id + " tbody").replaceChildren();
    }
    $("job-dataset").replaceChildren();
    $("job-detail").hidden = true;
  }

  async function connect() {
    if (!apiKey()) return;
    try {
      await loadDatasets();
      markKey(true, "key accepted (kept in this tab only)");
      showBanner("");
      await Promise.all([loadJobs(), loadModels()]);
    } catch (error) {
      if (error.status !== 401) showBanner(error.message);
    }
  }

  // -- datasets ----------------------------------------------------------------------------------

  async function loadDatasets() {
    const page = await api("/v1/datasets?limit=100");
    state.datasets = page.data;
    const rows = page.data.map((dataset) =>
      el(
        "tr",
        { dataset: { id: dataset.id } },
        el("td", { className: "mono" }, dataset.id),
        el("td", {}, dataset.name),
        el("td", {}, dataset.format),
        el("td", { className: "mono" }, "(" + ((dataset.shapes && dataset.shapes.sample_shape) || []).join(", ") + ")"),
        el("td", {}, Object.entries(dataset.splits || {}).map(([name, n]) => name + " " + n).join(", ")),
        el("td", {}, dataset.task_type || ""),
        el("td", {}, formatBytes(dataset.bytes)),
        el("td", {}, formatTime(dataset.created_at)),
        el("td", {}, el("button", { type: "button", className: "secondary", onclick: () => chooseDataset(dataset.id) }, "New job"))
      )
    );
    document.querySelector("#datasets-table tbody").replaceChildren(...rows);
    const select = $("job-dataset");
    const chosen = select.value;
    select.replaceChildren(
      ...page.data.map((dataset) => el("option", { value: dataset.id }, dataset.name + " — " + dataset.id))
    );
    if (chosen && page.data.some((dataset) => dataset.id === chosen)) select.value = chosen;
  }

  function chooseDataset(datasetId) {
    $("job-dataset").value = datasetId;
    $("new-job-section").scrollIntoView({ behavior: "smooth" });
  }

  function renderReport(container, report, heading) {
    const children = [el("p", { className: heading.ok ? "ok" : "error" }, heading.text)];
    const problems = [
      ...((report && report.errors) || []).map((item) => ["error", item]),
      ...((report && report.warnings) || []).map((item) => ["warning", item]),
    ];
    if (problems.length) {
      children.push(
        el(
          "ul",
          {},
          ...problems.map(([level, item]) =>
            el("li", { className: level }, level + ": ", item.field ? el("code", {}, item.field) : null, item.field ? " " : "", item.message || "")
          )
        )
      );
    } else if (heading.ok) {
      children.push(el("p", { className: "muted" }, "no problems found"));
    }
    container.replaceChildren(...children);
  }

  async function uploadDataset(event) {
    event.preventDefault();
    const file = $("upload-file").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file, file.name);
    const name = $("upload-name").value.trim();
    if (name) form.append("name", name);
    const labelColumn = $("upload-label-column").value.trim();
    if (labelColumn) form.append("label_column", labelColumn);
    const report = $("upload-report");
    report.replaceChildren();
    setText("upload-status", "uploading " + file.name + " (" + formatBytes(file.size) + ")…");
    $("upload-submit").disabled = true;
    try {
      const dataset = await api("/v1/datasets", { method: "POST", body: form });
      setText("upload-status", "");
      const summary =
        "accepted: " + dataset.id + " — " + (dataset.task_type || "task unknown") + ", sample shape (" +
        ((dataset.shapes && dataset.shapes.sample_shape) || []).join(", ") + "), " +
        Object.entries(dataset.splits || {}).map(([split, n]) => split + " " + n).join(", ");
      renderReport(report, dataset.report, { ok: true, text: summary });
      report.dataset.datasetId = dataset.id;
      await loadDatasets();
      chooseDataset(dataset.id);
    } catch (error) {
      setText("upload-status", "");
      const envelope = (error.body && error.body.error) || {};
      renderReport(report, envelope.report, { ok: false, text: "rejected: " + error.message });
    } finally {
      $("upload-submit").disabled = false;
    }
  }

  // -- job form ----------------------------------------------------------------------------------

  function autoOrNumber(id) {
    const raw = $(id).value.trim();
    if (raw === "" || raw.toLowerCase() === "auto") return "auto";
    const value = Number(raw);
    // Send what the user typed when it is not a number: the API names the field in its 422.
    if (!isFinite(value)) return raw;
    return value;
  }

  function integerField(id) {
    const value = Number($(id).value);
    return Number.isInteger(value) ? value : $(id).value;
  }

  function jobSpec() {
    const spec = {
      dataset_id: $("job-dataset").value,
      task: { type: $("job-task-type").value, metric: $("job-metric").value },
      backbone: $("job-backbone").value.trim() || "auto",
      alignment: {
        distance: $("job-align-distance").value,
        source: $("job-align-source").value.trim() || "auto",
        epochs: autoOrNumber("job-align-epochs"),
        max_samples: integerField("job-max-samples"),
      },
      finetune: {
        mode: $("job-ft-mode").value,
        epochs: autoOrNumber("job-ft-epochs"),
        lr: autoOrNumber("job-lr"),
        batch_size: autoOrNumber("job-batch-size"),
        optimizer: $("job-optimizer").value,
        early_stopping_patience: integerField("job-patience"),
      },
      seed: integerField("job-seed"),
      queue: $("job-queue").value,
      allow_random_init: $("job-allow-random-init").checked,
    };
    const name = $("job-name").value.trim();
    if (name) spec.name = name;
    return spec;
  }

  async function startJob(event) {
    event.preventDefault();
    if (!$("job-dataset").value) {
      setText("job-form-status", "upload or choose a dataset first");
      return;
    }
    $("job-submit").disabled = true;
    setText("job-form-status", "creating…");
    try {
      const job = await api("/v1/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
        body: JSON.stringify(jobSpec()),
      });
      setText("job-form-status", "created " + job.id);
      state.jobs.set(job.id, job);
      await loadJobs();
      watchJob(job.id);
    } catch (error) {
      setText("job-form-status", "not created: " + error.message);
    } finally {
      $("job-submit").disabled = false;
    }
  }

  // -- jobs --------------------------------------------------------------------------------------

  function progressCell(job) {
    return el(
      "td",
      {},
      el("progress", { max: 1, value: job.progress || 0 }),
      " " + Math.round((job.progress || 0) * 100) + "%"
    );
  }

  function jobRow(job) {
    return el(
      "tr",
      { dataset: { id: job.id }, className: job.id === state.watchedJobId ? "selected" : "" },
      el("td", { className: "mono" }, job.id),
      el("td", {}, job.name || ""),
      el("td", { className: "status status-" + job.status }, job.status),
      el("td", {}, job.stage || ""),
      progressCell(job),
      el("td", {}, TERMINAL.has(job.status) ? "" : formatSeconds(job.eta_seconds)),
      el("td", { className: "mono" }, job.model_id || ""),
      el("td", {}, formatTime(job.created_at)),
      el("td", {}, el("button", { type: "button", className: "secondary", onclick: () => watchJob(job.id) }, "Watch"))
    );
  }

  function renderJobs() {
    const jobs = [...state.jobs.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    document.querySelector("#jobs-table tbody").replaceChildren(...jobs.map(jobRow));
  }

  async function loadJobs() {
    const page = await api("/v1/jobs?limit=50");
    state.jobs = new Map(page.data.map((job) => [job.id, job]));
    renderJobs();
  }

  function renderJobDetail(job) {
    $("job-detail").hidden = false;
    setText("job-detail-id", job.id);
    setText("job-detail-status", job.status);
    $("job-detail-status").className = "status status-" + job.status;
    setText("job-detail-stage", job.stage || "–");
    setText("job-detail-eta", TERMINAL.has(job.status) ? "–" : formatSeconds(job.eta_seconds));
    $("job-progress").value = job.progress || 0;
    setText("job-progress-text", Math.round((job.progress || 0) * 100) + "%");
    $("job-cancel").hidden = TERMINAL.has(job.status) || job.status === "cancelling";
    const error = $("job-detail-error");
    error.hidden = !job.error;
    error.textContent = job.error ? job.error.code + ": " + job.error.message : "";
    const metrics = job.metrics || {};
    const alignment = metrics.alignment || {};
    const rows = [
      ["validation", formatMetrics(metrics.val)],
      ["test", formatMetrics(metrics.test)],
      ["alignment", typeof alignment.before === "number" ? formatNumber(alignment.before) + " → " + formatNumber(alignment.after) : ""],
      ["model", job.model_id || ""],
    ].filter(([, value]) => value);
    $("job-detail-metrics").replaceChildren(...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  }

  async function refreshWatchedJob() {
    const jobId = state.watchedJobId;
    if (!jobId) return null;
    const job = await api("/v1/jobs/" + encodeURIComponent(jobId));
    if (jobId !== state.watchedJobId) return null;
    state.jobs.set(job.id, job);
    renderJobs();
    renderJobDetail(job);
    return job;
  }

  // Run fn at most once per `ms` for `name`, always including the latest call.
  function throttle(name, ms, fn) {
    if (state.timers[name]) return;
    state.timers[name] = setTimeout(() => {
      state.timers[name] = null;
      fn().catch((error) => showBanner(error.message));
    }, ms);
  }

  function appendEvent(event) {
    const list = $("job-events");
    list.append(
      el(
        "li",
        { className: "event-" + event.kind },
        el("span", { className: "muted" }, formatTime(event.created_at) + " "),
        el("span", { className: "kind" }, event.kind),
        " " + event.message
      )
    );
    while (list.childElementCount > MAX_EVENT_LINES) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  function stopStream() {
    if (state.stream) state.stream.abort();
    state.stream = null;
    clearInterval(state.poller);
    state.poller = null;
    for (const name of Object.keys(state.timers)) {
      clearTimeout(state.timers[name]);
      state.timers[name] = null;
    }
  }

  function watchJob(jobId) {
    stopStream();
    // Progress and ETA live on the job, not in its events: poll it too while the stream runs,
    // so the bar moves through long quiet epochs.
    state.poller = setInterval(() => {
      const job = state.jobs.get(jobId);
      if (job && TERMINAL.has(job.status)) return;
      throttle("job", 0, refreshWatchedJob);
    }, 1500);
    state.watchedJobId = jobId;
    $("job-events").replaceChildren();
    for (const name of ["alignment", "training"]) clearPlot(name, "");
    const job = state.jobs.get(jobId);
    if (job) renderJobDetail(job);
    renderJobs();
    const controller = new AbortController();
    state.stream = controller;
    followEvents(jobId, controller.signal).catch((error) => {
      if (!controller.signal.aborted) showBanner(error.message);
    });
    $("job-detail").scrollIntoView({ behavior: "smooth" });
  }

  // The job's live event log over Server-Sent Events, read with fetch() so the key stays in the
  // Authorization header. Reconnects with Last-Event-ID until the server sends `end`.
  async function followEvents(jobId, signal) {
    let lastEventId = 0;
    let ended = false;
    let failures = 0;
    while (!ended && !signal.aborted) {
      setText("job-stream-state", "live");
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
        const response = await api("/v1/jobs/" + encodeURIComponent(jobId) + "/events", { headers, signal, raw: true });
        failures = 0;
        for await (const message of sseMessages(response.body, signal)) {
          if (message.id) lastEventId = Number(message.id) || lastEventId;
          if (message.event === "end") {
            ended = true;
            break;
          }
          if (!message.data) continue;
          onJobEvent(JSON.parse(message.data));
        }
        // The server closed the stream before `end` (a restart): pick up where it stopped.
        if (!ended) await new Promise((resolve) => setTimeout(resolve, 1000));
      } catch (error) {
        if (signal.aborted) return;
        if (error.status && error.status < 500) throw error; // 401/404: retrying cannot help
        failures += 1;
        setText("job-stream-state", "reconnecting…");
        await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * 2 ** failures, 15000)));
      }
    }
    if (signal.aborted) return;
    clearInterval(state.poller);
    state.poller = null;
    setText("job-stream-state", "finished");
    await refreshWatchedJob();
    await Promise.all([loadPlot("alignment"), loadPlot("training")]);
    await loadModels();
  }

  async function* sseMessages(body, signal) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      while (!signal.aborted) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let boundary;
        while ((boundary = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, boundary);
          buffer = buffer.slice(boundary + 2);
          const message = { event: "message", data: "", id: null };
          const data = [];
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue; // comments are keep-alive pings
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "data") data.push(value);
            else if (field === "event") message.event = value;
            else if (field === "id") message.id = value;
          }
          message.data = data.join("\n");
          if (data.length || message.event !== "message") yield message;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function onJobEvent(event) {
    appendEvent(event);
    throttle("job", 250, refreshWatchedJob);
    if (event.kind === "metric") {
      const stage = event.data && event.data.stage;
      if (stage === "align") throttle("plot-alignment", 1000, () => loadPlot("alignment"));
      if (stage === "refine") throttle("plot-training", 1000, () => loadPlot("training"));
    }
  }

  // -- plots -------------------------------------------------------------------------------------

  function clearPlot(name, message) {
    const figure = $("plot-" + name);
    const image = figure.querySelector("img");
    if (state.plotUrls[name]) URL.revokeObjectURL(state.plotUrls[name]);
    delete state.plotUrls[name];
    image.removeAttribute("src");
    image.hidden = true;
    figure.querySelector(".plot-state").textContent = message;
  }

  async function loadPlot(name) {
    const jobId = state.watchedJobId;
    if (!jobId) return;
    const figure = $("plot-" + name);
    try {
      const response = await api("/v1/jobs/" + encodeURIComponent(jobId) + "/plots/" + name + ".png", { raw: true });
      const blob = await response.blob();
      if (jobId !== state.watchedJobId) return;
      const url = URL.createObjectURL(blob);
      const image = figure.querySelector("img");
      const previous = state.plotUrls[name];
      state.plotUrls[name] = url;
      image.src = url;
      image.hidden = false;
      if (previous) URL.revokeObjectURL(previous);
      figure.querySelector(".plot-state").textContent = "";
    } catch (error) {
      if (jobId !== state.watchedJobId) return;
      clearPlot(name, error.code === "plot_not_ready" ? "(no data yet)" : "(" + error.message + ")");
    }
  }

  async function cancelWatchedJob() {
    const jobId = state.watchedJobId;
    if (!jobId) return;
    try {
      const job = await api("/v1/jobs/" + encodeURIComponent(jobId) + "/cancel", { method: "POST" });
      state.jobs.set(job.id, job);
      renderJobs();
      renderJobDetail(job);
    } catch (error) {
      showBanner(error.message);
    }
  }

  // -- models ------------------------------------------------------------------------------------

  async function loadModels() {
    const page = await api("/v1/models?limit=100");
    const rows = page.data.map((model) => {
      const spec = model.task_spec || {};
      const metrics = model.metrics || {};
      const alignment = metrics.alignment || {};
      return el(
        "tr",
        { dataset: { id: model.id } },
        el("td", { className: "mono" }, model.id),
        el("td", {}, model.name || ""),
        el("td", { className: "mono" }, model.job_id),
        el("td", {}, spec.backbone || ""),
        el("td", {}, [spec.task_type, spec.metric].filter(Boolean).join(" / ")),
        el("td", { className: "metrics-val" }, formatMetrics(metrics.val)),
        el("td", { className: "metrics-test" }, formatMetrics(metrics.test)),
        el("td", {}, typeof alignment.before === "number" ? formatNumber(alignment.before) + " → " + formatNumber(alignment.after) : ""),
        el("td", {}, formatBytes(model.bytes)),
        el("td", {}, formatTime(model.created_at))
      );
    });
    document.querySelector("#models-table tbody").replaceChildren(...rows);
  }

  // -- wiring ------------------------------------------------------------------------------------

  function guarded(fn) {
    return (...args) =>
      Promise.resolve(fn(...args)).catch((error) => {
        if (error.status !== 401) showBanner(error.message);
      });
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", guarded(useKey));
    $("forget-key").addEventListener("click", forgetKey);
    $("upload-form").addEventListener("submit", guarded(uploadDataset));
    $("job-form").addEventListener("submit", guarded(startJob));
    $("refresh-datasets").addEventListener("click", guarded(loadDatasets));
    $("refresh-jobs").addEventListener("click", guarded(loadJobs));
    $("refresh-models").addEventListener("click", guarded(loadModels));
    $("job-cancel").addEventListener("click", guarded(cancelWatchedJob));
    if (apiKey()) connect();
  });
})();
