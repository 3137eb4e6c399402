// comfyq dashboard: plain JavaScript over the public REST API (/v1/…).
// Every request carries the API key kept in localStorage (none in open
// mode). Media and event streams are fetched with that header too, since
// <img src> and EventSource cannot send one.
'use strict';

const KEY_STORAGE = 'comfyq.apiKey';
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
const STATUSES = ['accepted', 'queued', 'dispatched', 'running', 'retrying', 'completed', 'failed', 'cancelled'];

// ---- small helpers ----------------------------------------------------------

/** Builds an element; strings become text nodes (never HTML). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const apiKey = () => localStorage.getItem(KEY_STORAGE) || '';

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const key = apiKey();
  if (key) headers.Authorization = 'Bearer ' + key;
  return headers;
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problemText(status, problem));
    this.status = status;
    this.problem = problem;
  }
}

/** An RFC 9457 problem document as one sentence for a person. */
function problemText(status, problem) {
  if (!problem) return `The API answered HTTP ${status}`;
  let text = `${problem.title || 'Error'} (HTTP ${status})`;
  if (problem.errors && problem.errors.length) {
    text += ': ' + problem.errors.map((e) => `${e.pointer || '(body)'}: ${e.message}`).join('; ');
  } else if (problem.detail) {
    text += ': ' + problem.detail;
  }
  if (status === 401) text += ' — enter the API key above.';
  return text;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers: authHeaders(options.headers) }));
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new Error('The comfyq API cannot be reached: ' + error.message);
  }
  if (!response.ok) {
    let problem = null;
    try { problem = await response.json(); } catch (_) { /* not a problem document */ }
    const error = new ApiError(response.status, problem);
    if (response.status === 401) showBanner(error.message);
    throw error;
  }
  return response.json();
}

function showBanner(text) {
  const banner = document.getElementById('banner');
  banner.textContent = text;
  banner.hidden = !text;
}

function errorBox(error) {
  return h('p', { class: 'error' }, error.message || String(error));
}

function time(rfc3339) {
  if (!rfc3339) return '';
  const date = new Date(rfc3339);
  return Number.isNaN(date.getTime()) ? rfc3339 : date.toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  if (seconds < 1) return Math.round(seconds * 1000) + ' ms';
  if (seconds < 60) return seconds.toFixed(1) + ' s';
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function between(from, to) {
  if (!from || !to) return null;
  return (new Date(to) - new Date(from)) / 1000;
}

function bytes(size) {
  if (size < 1024) return size + ' B';
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = size;
  let unit = 'B';
  for (const next of units) {
    if (value < 1024) break;
    value /= 1024;
    unit = next;
  }
  return value.toFixed(1) + ' ' + unit;
}

const badge = (status) => h('span', { class: 'badge ' + status }, status);

function table(headers, rows, empty) {
  if (!rows.length) return h('p', { class: 'muted' }, empty);
  return h('table', {},
    h('thead', {}, h('tr', {}, headers.map((name) => h('th', {}, name)))),
    h('tbody', {}, rows.map((cells) => h('tr', {}, cells.map((cell) => h('td', {}, cell))))));
}

const jobLink = (id) => h('a', { href: '#/jobs/' + id, class: 'mono' }, id);

// ---- pages ------------------------------------------------------------------

/** What a page may leave running: timers and streams, stopped on navigation. */
class PageScope {
  constructor() {
    this.controller = new AbortController();
    this.timers = [];
  }
  get signal() { return this.controller.signal; }
  /** Runs `fn` now and every `ms` until the page is left. */
  every(ms, fn) {
    const tick = async () => {
      if (this.signal.aborted) return;
      try { await fn(); } catch (error) { if (error.name !== 'AbortError') console.warn(error); }
      if (!this.signal.aborted) this.timers.push(setTimeout(tick, ms));
    };
    tick();
  }
  close() {
    this.controller.abort();
    this.timers.forEach(clearTimeout);
  }
}

async function queuePage(main, scope) {
  const levels = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const summary = h('p', { class: 'muted' });
  main.append(h('h1', {}, 'Queue'), summary, levels);
  scope.every(2000, async () => {
    try {
      const [queue, runners] = await Promise.all([
        api('/v1/queue', { signal: scope.signal }),
        api('/v1/runners', { signal: scope.signal }),
      ]);
      const list = runners.runners;
      const slots = list.reduce((n, r) => n + r.slots, 0);
      const busy = list.reduce((n, r) => n + r.busy, 0);
      summary.textContent = `${list.length} runner(s), ${list.filter((r) => r.ready).length} ready, ${busy} of ${slots} slot(s) busy`;
      levels.replaceChildren(table(
        ['Pool', 'Priority', 'Waiting', 'In flight', 'Oldest wait'],
        queue.levels.map((l) => [l.pool, l.priority, String(l.depth), String(l.in_flight),
          l.oldest_wait_s === null ? '—' : duration(l.oldest_wait_s)]),
        'No pools yet: no runner has registered.'));
      levels.dataset.loaded = 'true';
    } catch (error) {
      if (error.name !== 'AbortError') levels.replaceChildren(errorBox(error));
    }
  });
}

async function runnersPage(main, scope) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  main.append(h('h1', {}, 'Runners'), body);
  scope.every(3000, async () => {
    try {
      const { runners } = await api('/v1/runners', { signal: scope.signal });
      body.replaceChildren(table(
        ['Runner', 'Pool', 'Ready', 'Busy / slots', 'ComfyUI', 'Labels', 'Node types', 'Models', 'Last seen'],
        runners.map((r) => {
          const models = Object.entries(r.models || {}).filter(([, files]) => Array.isArray(files));
          const modelCount = models.reduce((n, [, files]) => n + files.length, 0);
          return [
            h('span', { class: 'mono' }, r.runner), r.pool,
            h('span', { class: r.ready ? 'ok' : 'bad' }, r.ready ? 'ready' : 'not ready'),
            `${r.busy} / ${r.slots}`, r.comfyui_version || '—',
            Object.entries(r.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ') || '—',
            h('details', {}, h('summary', {}, String(r.node_types.length)),
              h('p', { class: 'small' }, r.node_types.join(', '))),
            h('details', {}, h('summary', {}, String(modelCount)),
              models.map(([folder, files]) => h('p', { class: 'small' }, `${folder}: ${files.join(', ') || '—'}`))),
            duration(between(r.updated_at, new Date().toISOString())) + ' ago',
          ];
        }),
        'No runner is registered.'));
    } catch (error) {
      if (error.name !== 'AbortError') body.replaceChildren(errorBox(error));
    }
  });
}

async function jobsPage(main, scope, query) {
  const selected = new Set((query.get('status') || '').split(',').filter(Boolean));
  const limit = query.get('limit') || '50';
  const cursor = query.get('cursor');
  const filters = h('form', { class: 'filters', onsubmit: (event) => {
    event.preventDefault();
    const statuses = [...filters.querySelectorAll('input[name=status]:checked')].map((i) => i.value);
    const params = new URLSearchParams();
    if (statuses.length) params.set('status', statuses.join(','));
    params.set('limit', filters.querySelector('select[name=limit]').value);
    location.hash = '#/jobs?' + params;
  } },
  STATUSES.map((s) => h('label', {}, h('input', { type: 'checkbox', name: 'status', value: s, checked: selected.has(s) }), s)),
  h('select', { name: 'limit' }, ['20', '50', '100', '200'].map((n) => h('option', { value: n, selected: n === limit }, n + ' per page'))),
  h('button', { type: 'submit' }, 'Filter'));

  const list = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  main.append(h('h1', {}, 'Jobs'), submitForm(), filters, list);

  const params = new URLSearchParams({ limit });
  if (selected.size) params.set('status', [...selected].join(','));
  if (cursor) params.set('cursor', cursor);
  const load = async () => {
    try {
      const page = await api('/v1/jobs?' + params, { signal: scope.signal });
      const rows = page.jobs.map((j) => [jobLink(j.id), badge(j.status), j.priority, j.pool,
        time(j.created_at), duration(between(j.created_at, j.finished_at)), String(j.outputs.length)]);
      const more = page.next_cursor
        ? h('a', { class: 'button', href: '#/jobs?' + new URLSearchParams(Object.assign(Object.fromEntries(params), { cursor: page.next_cursor })) }, 'Next page')
        : null;
      list.replaceChildren(table(['Job', 'Status', 'Priority', 'Pool', 'Created', 'Took', 'Outputs'], rows, 'No jobs match.'), more || '');
    } catch (error) {
      if (error.name !== 'AbortError') list.replaceChildren(errorBox(error));
    }
  };
  // The first page follows new jobs; later pages stay put.
  if (cursor) load(); else scope.every(3000, load);
}

/** A workflow (API format) or a whole job body, submitted as JSON. */
function submitForm() {
  const workflow = h('textarea', { id: 'submit-workflow', rows: 8, spellcheck: 'false',
    placeholder: '{"1": {"class_type": "EmptyImage", "inputs": {…}}, …}  or  {"workflow": {…}, "priority": "high"}' });
  const priority = h('select', { id: 'submit-priority' }, ['', 'high', 'normal', 'low'].map((p) => h('option', { value: p }, p || 'priority from the body')));
  const pool = h('input', { id: 'submit-pool', placeholder: 'pool (default)' });
  const result = h('div', {});
  const form = h('form', { class: 'submit', onsubmit: async (event) => {
    event.preventDefault();
    result.replaceChildren();
    let body;
    try {
      body = JSON.parse(workflow.value);
    } catch (error) {
      result.replaceChildren(errorBox(new Error('Not valid JSON: ' + error.message)));
      return;
    }
    if (!(body && typeof body.workflow === 'object')) body = { workflow: body };
    if (priority.value) body.priority = priority.value;
    if (pool.value.trim()) body.pool = pool.value.trim();
    try {
      const job = await api('/v1/jobs', { method: 'POST', body: JSON.stringify(body), headers: { 'Content-Type': 'application/json' } });
      location.hash = '#/jobs/' + job.id;
    } catch (error) {
      result.replaceChildren(errorBox(error));
    }
  } }, workflow, h('div', { class: 'row' }, priority, pool, h('button', { id: 'submit-button', type: 'submit' }, 'Submit')), result);
  return h('details', { class: 'panel' }, h('summary', {}, 'Submit a job'), form);
}

/** Bytes fetched with the API key, shown as the element their type calls for. */
async function mediaElement(file, signal) {
  const response = await fetch(file.url, { headers: authHeaders(), signal });
  if (!response.ok) throw new ApiError(response.status, null);
  const url = URL.createObjectURL(await response.blob());
  signal.addEventListener('abort', () => URL.revokeObjectURL(url));
  const type = file.content_type || '';
  let media;
  if (type.startsWith('image/')) media = h('img', { src: url, alt: file.name, class: 'media' });
  else if (type.startsWith('video/')) media = h('video', { src: url, controls: true, class: 'media' });
  else if (type.startsWith('audio/')) media = h('audio', { src: url, controls: true });
  else media = null;
  return h('figure', { dataset: { name: file.name } }, media || '',
    h('figcaption', {}, h('a', { href: url, download: file.name }, file.name), ` ${type}, ${bytes(file.size)}`));
}

async function jobPage(main, scope, _query, id) {
  const header = h('div', { class: 'job-header' });
  const actions = h('div', { class: 'actions' });
  const notice = h('div', {});
  const progressBar = h('progress', { id: 'job-progress', max: 1, value: 0 });
  const progressText = h('span', { id: 'job-progress-text', class: 'muted' });
  const timeline = h('ol', { id: 'job-timeline', class: 'timeline' });
  const eventLog = h('ol', { class: 'log' });
  const outputs = h('div', { id: 'job-outputs', class: 'gallery' }, h('p', { class: 'muted' }, 'None yet.'));
  const inputs = h('div', { id: 'job-inputs', class: 'gallery' });
  const errorPanel = h('div', { id: 'job-error' });
  const webhooks = h('div', { id: 'job-webhooks' });
  const details = h('div', {});
  main.append(
    h('p', {}, h('a', { href: '#/jobs' }, '← Jobs')), header, actions, notice,
    h('section', {}, h('h2', {}, 'Progress'), progressBar, ' ', progressText,
      h('p', { class: 'small muted' }, 'Previews: the HTTP API does not serve sampler previews; they are published on NATS (comfyq.previews.<tenant>.<job>, see EVENTS.md).')),
    h('section', {}, h('h2', {}, 'Timeline'), timeline, h('details', {}, h('summary', {}, 'All events'), eventLog)),
    errorPanel,
    h('section', {}, h('h2', {}, 'Outputs'), outputs),
    h('section', {}, h('h2', {}, 'Inputs'), inputs),
    webhooks, details);

  let job = null;
  let mediaShown = '';
  // Once completed the bar stays full: a reply read before the end must not
  // move it back.
  let finished = false;
  const setFraction = (fraction) => { if (!finished) progressBar.value = fraction; };
  const finish = () => { finished = true; progressBar.value = 1; };
  // Deliveries change after the job ends: read until each has delivered or died.
  let webhooksSettled = false;

  const render = async () => {
    job = await api('/v1/jobs/' + encodeURIComponent(id), { signal: scope.signal });
    header.replaceChildren(
      h('h1', {}, 'Job ', h('span', { class: 'mono' }, job.id)),
      h('p', {}, h('span', { id: 'job-status', dataset: { status: job.status } }, badge(job.status)),
        ` ${job.priority} priority · pool ${job.pool} · attempt ${job.attempt}`,
        job.requeues ? ` · requeued ${job.requeues}×` : '',
        job.runner ? ` · runner ${job.runner}` : '',
        job.queue_position !== undefined ? ` · ${job.queue_position} ahead in the queue` : '',
        job.waiting_reason ? ` · ${job.waiting_reason.replaceAll('_', ' ')}` : '',
        job.cancel_requested && !TERMINAL.has(job.status) ? ' · cancel requested' : ''));
    actions.replaceChildren(
      h('button', { id: 'cancel-job', disabled: TERMINAL.has(job.status), onclick: () => act('cancel') }, 'Cancel'),
      h('button', { id: 'retry-job', disabled: job.status !== 'failed', onclick: () => act('retry') }, 'Retry'));
    if (job.progress && !finished) {
      setFraction(job.progress.fraction);
      progressText.textContent = progressLabel(job.progress);
    }
    if (job.status === 'completed') {
      finish();
      progressText.textContent = 'completed in ' + duration(between(job.created_at, job.finished_at));
    }
    errorPanel.replaceChildren(...(job.error ? [h('section', {}, h('h2', {}, 'Error'), errorDetails(job.error))] : []));
    // Media once per change of the file list (each is a download).
    const shown = JSON.stringify([job.outputs.map((o) => o.sha256), job.inputs.map((i) => i.sha256)]);
    if (shown !== mediaShown) {
      mediaShown = shown;
      await showMedia(outputs, job.outputs, 'None yet.');
      await showMedia(inputs, job.inputs, 'None.');
    }
    if (job.webhook && !webhooksSettled) await showWebhooks();
    details.replaceChildren(h('section', {}, h('h2', {}, 'Details'), h('dl', {},
      h('dt', {}, 'Created'), h('dd', {}, time(job.created_at)),
      h('dt', {}, 'Queued'), h('dd', {}, time(job.queued_at) || '—'),
      h('dt', {}, 'Started'), h('dd', {}, time(job.started_at) || '—'),
      h('dt', {}, 'Finished'), h('dd', {}, time(job.finished_at) || '—'),
      h('dt', {}, 'Timeout'), h('dd', {}, job.timeout_s + ' s'),
      h('dt', {}, 'Metadata'), h('dd', {}, job.metadata ? h('pre', {}, JSON.stringify(job.metadata, null, 2)) : '—'))));
  };

  const showMedia = async (target, files, empty) => {
    if (!files.length) { target.replaceChildren(h('p', { class: 'muted' }, empty)); return; }
    const figures = await Promise.all(files.map((file) => mediaElement(file, scope.signal)
      .catch((error) => h('p', { class: 'error' }, `${file.name}: ${error.message}`))));
    target.replaceChildren(...figures);
  };

  const showWebhooks = async () => {
    const { deliveries } = await api(`/v1/jobs/${encodeURIComponent(id)}/webhooks`, { signal: scope.signal });
    webhooksSettled = TERMINAL.has(job.status) && deliveries.length > 0
      && deliveries.every((d) => d.state === 'delivered' || d.state === 'dead');
    webhooks.replaceChildren(h('section', {}, h('h2', {}, 'Webhook deliveries'),
      h('p', { class: 'small' }, job.webhook.url),
      table(['Event', 'State', 'Attempts', 'Next attempt'], deliveries.map((d) => [d.type, badge(d.state),
        h('ul', { class: 'plain' }, d.attempts.map((a) => h('li', {}, `${time(a.at)}: ${a.status ? 'HTTP ' + a.status : a.error || '?'} (${a.latency_ms} ms)`))),
        time(d.next_attempt_at) || '—']), 'No delivery yet.')));
  };

  const act = async (action) => {
    notice.replaceChildren();
    try {
      await api(`/v1/jobs/${encodeURIComponent(id)}/${action}`, { method: 'POST' });
      notice.replaceChildren(h('p', { class: 'ok' }, action === 'cancel' ? 'Cancellation requested.' : 'Requeued.'));
      await render();
      if (action === 'retry') follow();
    } catch (error) {
      notice.replaceChildren(errorBox(error));
    }
  };

  const onEvent = (event) => {
    const data = event.data.data || {};
    eventLog.append(h('li', {}, h('span', { class: 'mono' }, `${event.id} `), `${time(event.data.at)} ${event.type}`));
    if (data.fraction !== undefined) setFraction(data.fraction);
    if ((event.type === 'job.progress' || event.type === 'job.node') && !finished) progressText.textContent = progressLabel(data);
    const kind = event.type.replace(/^job\./, '');
    if (kind === 'completed') finish();
    if (data.status === kind) {
      timeline.append(h('li', { class: kind }, badge(kind), ' ', time(event.data.at),
        data.runner ? ` on ${data.runner}` : '', data.error ? ` — ${data.error.kind}: ${data.error.message}` : ''));
      render().catch(() => {});
    }
  };

  const follow = () => {
    timeline.replaceChildren();
    eventLog.replaceChildren();
    streamEvents(`/v1/jobs/${encodeURIComponent(id)}/events`, onEvent, scope.signal)
      .then(() => render())
      .catch((error) => { if (error.name !== 'AbortError') notice.replaceChildren(errorBox(error)); });
  };

  try {
    await render();
  } catch (error) {
    if (error.name !== 'AbortError') main.replaceChildren(h('p', {}, h('a', { href: '#/jobs' }, '← Jobs')), errorBox(error));
    return;
  }
  follow();
  // The queue position is not an event: read it while the job waits.
  scope.every(1500, async () => {
    if (job && ['accepted', 'queued', 'dispatched'].includes(job.status)) await render();
    else if (job && job.webhook && !webhooksSettled) await showWebhooks();
  });
}

function progressLabel(p) {
  let text = Math.round((p.fraction || 0) * 100) + '%';
  if (p.node_id) text += ` · node ${p.node_id}${p.node_type ? ' ' + p.node_type : ''}`;
  if (p.value !== undefined && p.value !== null && p.max) text += ` · step ${p.value}/${p.max}`;
  return text;
}

function errorDetails(error) {
  return h('div', { class: 'error-details' },
    h('p', {}, h('strong', {}, error.kind), ': ', error.message),
    error.node_id ? h('p', {}, `Node ${error.node_id}${error.node_type ? ' (' + error.node_type + ')' : ''}`) : '',
    error.exception_type ? h('p', {}, 'Exception: ', h('code', {}, error.exception_type)) : '',
    error.traceback && error.traceback.length ? h('pre', {}, error.traceback.join('\n')) : '',
    error.details ? h('pre', {}, JSON.stringify(error.details, null, 2)) : '');
}

/**
 * A job's Server-Sent Events over fetch (EventSource cannot send the API key).
 * The server closes the stream after a terminal event, or early when a
 * connection drops: then it is reopened with Last-Event-ID, so nothing is
 * missed or repeated. A terminal event ends the feed only if the job still
 * ends there (a requeued dead letter has a job.failed, then a new attempt).
 */
async function streamEvents(path, onEvent, signal) {
  let lastId = null;
  let lastEnd = null; // {status, attempt} of the last terminal event
  for (let failures = 0; failures < 10 && !signal.aborted;) {
    const headers = authHeaders({ Accept: 'text/event-stream' });
    if (lastId !== null) headers['Last-Event-ID'] = lastId;
    try {
      const response = await fetch(path, { headers, signal });
      if (!response.ok) {
        let problem = null;
        try { problem = await response.json(); } catch (_) { /* not a problem document */ }
        throw new ApiError(response.status, problem);
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          lastId = event.id;
          failures = 0;
          const status = event.type.replace(/^job\./, '');
          if (TERMINAL.has(status)) lastEnd = { status, attempt: (event.data.data || {}).attempt };
          onEvent(event);
        }
      }
    } catch (error) {
      if (error.name === 'AbortError' || error instanceof ApiError) throw error;
    }
    try {
      const job = await api(path.replace(/\/events$/, ''), { signal });
      if (lastEnd && job.status === lastEnd.status && job.attempt === lastEnd.attempt) return;
    } catch (error) {
      if (error.name === 'AbortError') throw error;
    }
    failures += 1;
    if (!lastEnd) await sleep(1000); // a dropped connection: give the server a moment
  }
}

function parseEvent(block) {
  let id = null;
  let type = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue; // heartbeat comment
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'id') id = value;
    else if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
  }
  if (id === null || !data.length) return null;
  try {
    return { id, type, data: JSON.parse(data.join('\n')) };
  } catch (_) {
    return null;
  }
}

async function deadLettersPage(main, scope) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  const notice = h('div', {});
  main.append(h('h1', {}, 'Dead letters'),
    h('p', { class: 'muted' }, 'Jobs whose attempts ran out. Retry requeues one with a fresh attempt budget.'),
    notice, body);
  const load = async () => {
    try {
      const page = await api('/v1/dead-letters?limit=200', { signal: scope.signal });
      body.replaceChildren(table(['Job', 'Pool', 'Priority', 'Attempts', 'Requeues', 'Error', 'Failed', ''],
        page.dead_letters.map((d) => [jobLink(d.job_id), d.pool, d.priority, String(d.attempts), String(d.requeues),
          d.error ? `${d.error.kind}: ${d.error.message}` : '—', time(d.failed_at),
          h('button', { class: 'retry', dataset: { job: d.job_id }, onclick: async () => {
            try {
              await api(d.retry_url, { method: 'POST' });
              notice.replaceChildren(h('p', { class: 'ok' }, 'Requeued ', jobLink(d.job_id), '.'));
              await load();
            } catch (error) {
              notice.replaceChildren(errorBox(error));
            }
          } }, 'Retry')]),
        'No dead letters.'));
    } catch (error) {
      if (error.name !== 'AbortError') body.replaceChildren(errorBox(error));
    }
  };
  scope.every(5000, load);
}

// ---- routing and the API key --------------------------------------------------

const ROUTES = [
  [/^\/?$/, queuePage, 'queue'],
  [/^\/queue$/, queuePage, 'queue'],
  [/^\/runners$/, runnersPage, 'runners'],
  [/^\/jobs$/, jobsPage, 'jobs'],
  [/^\/jobs\/([0-9a-zA-Z-]+)$/, jobPage, 'jobs'],
  [/^\/dead-letters$/, deadLettersPage, 'dead-letters'],
];

let currentScope = null;

function route() {
  if (currentScope) currentScope.close();
  currentScope = new PageScope();
  showBanner('');
  const [path, search] = location.hash.replace(/^#/, '').split('?');
  const main = document.getElementById('main');
  main.replaceChildren();
  for (const [pattern, page, nav] of ROUTES) {
    const match = path.match(pattern);
    if (!match) continue;
    document.querySelectorAll('nav a').forEach((a) => a.classList.toggle('active', a.dataset.nav === nav));
    page(main, currentScope, new URLSearchParams(search || ''), ...match.slice(1));
    return;
  }
  main.append(h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/queue' }, 'Back to the queue')));
}

function showKeyState() {
  document.getElementById('key-state').textContent = apiKey() ? 'key saved in this browser' : 'no key (open mode)';
}

function setUpKeyForm() {
  const input = document.getElementById('api-key');
  document.getElementById('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    if (input.value.trim()) localStorage.setItem(KEY_STORAGE, input.value.trim());
    input.value = '';
    showKeyState();
    route();
  });
  document.getElementById('forget-key').addEventListener('click', () => {
    localStorage.removeItem(KEY_STORAGE);
    showKeyState();
    route();
  });
  showKeyState();
}

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => {
  setUpKeyForm();
  route();
});
