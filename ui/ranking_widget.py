"""The ranking screen's interactive list: a gr.HTML block whose script talks to the REST API
(/api/rankings/...) with the session cookie. Ordering logic is only presentation; queueing,
validation and storage live in backend/labels/rankings.py.

Keys: press candidate numbers best to worst (3, 1, 4, 2), or select one and move it with the arrow
keys; drag works too; Enter submits. Candidate and prompt text are set with textContent (never HTML).
"""
from __future__ import annotations

import gradio as gr

SKELETON = """
<div class="pg-rank" tabindex="0">
  <div class="pg-bar">
    <label>Set <select class="pg-set"><option value="">all sets</option></select></label>
    <button type="button" class="pg-guide-btn">Guidelines</button>
    <button type="button" class="pg-prev">Previous</button>
    <select class="pg-mine" aria-label="revisit one of my rankings"><option value="">revisit my rankings...</option></select>
    <span class="pg-status" role="status"></span>
  </div>
  <pre class="pg-guide" hidden></pre>
  <div class="pg-prompt-label">Prompt</div>
  <div class="pg-prompt"></div>
  <div class="pg-hint">Best first. Press candidate numbers best to worst, or select one and move it with the arrow keys, or drag. Enter submits.</div>
  <ol class="pg-cands"></ol>
  <div class="pg-actions">
    <label><input type="checkbox" class="pg-allbad"> All are bad</label>
    <button type="button" class="pg-skip">Skip</button>
    <button type="button" class="pg-submit">Submit (Enter)</button>
  </div>
</div>
"""

CSS = """
.pg-rank { outline: none; }
.pg-bar, .pg-actions { display: flex; gap: .75em; align-items: center; margin: .5em 0; flex-wrap: wrap; }
.pg-prompt { white-space: pre-wrap; padding: .6em; border-radius: 6px; background: var(--block-background-fill, #f6f6f6); }
.pg-prompt-label, .pg-hint { font-size: .85em; opacity: .75; margin-top: .5em; }
.pg-cands { list-style: none; padding: 0; }
.pg-cand { display: flex; gap: .75em; padding: .6em; margin: .35em 0; border: 1px solid #ccc; border-radius: 6px; cursor: grab; }
.pg-cand.pg-sel { border: 2px solid #f97316; }
.pg-rankno { font-weight: bold; min-width: 2.2em; }
.pg-badge { display: inline-block; min-width: 1.6em; text-align: center; border-radius: 4px; background: #334155; color: white; }
.pg-text { white-space: pre-wrap; flex: 1; }
.pg-flag { align-self: flex-start; font-size: .8em; }
.pg-guide { white-space: pre-wrap; max-height: 24em; overflow: auto; border: 1px solid #ccc; padding: .6em; }
"""

JS = r"""
const root = element.querySelector('.pg-rank');
const $ = (s) => root.querySelector(s);
let item = null, order = [], sel = 0, placed = 0;
const FLAGS = ['spam', 'unsafe', 'off-topic'];  // backend.labels.review.FLAGS
const history = [];

async function api(method, url, body) {
  const opts = {method, credentials: 'same-origin', headers: {}};
  if (body !== undefined) { opts.headers['Content-Type'] = 'application/json'; opts.body = JSON.stringify(body); }
  const r = await fetch(url, opts);
  let data = null;
  try { data = await r.json(); } catch (e) {}
  if (!r.ok) {
    const d = data && data.detail;
    throw new Error(typeof d === 'string' ? d : (d ? JSON.stringify(d) : r.status + ' ' + r.statusText));
  }
  return data;
}
function status(msg) { $('.pg-status').textContent = msg; }

function render() {
  const list = $('.pg-cands');
  list.replaceChildren();
  $('.pg-prompt').textContent = item ? item.prompt : '';
  root.dataset.itemId = item ? String(item.item_id) : '';
  if (!item) return;
  order.forEach((cid, rank) => {
    const c = item.candidates.find((x) => x.id === cid);
    const li = document.createElement('li');
    li.className = 'pg-cand' + (rank === sel ? ' pg-sel' : '');
    li.draggable = true;
    li.dataset.cid = String(cid);
    const no = document.createElement('span'); no.className = 'pg-rankno'; no.textContent = '#' + (rank + 1);
    const badge = document.createElement('span'); badge.className = 'pg-badge'; badge.textContent = String(c.position + 1);
    const text = document.createElement('div'); text.className = 'pg-text'; text.textContent = c.text;
    // Flag a candidate for review (spam, unsafe, off-topic), as Open-Assistant lets labelers do.
    const flag = document.createElement('select');
    flag.className = 'pg-flag';
    flag.setAttribute('aria-label', 'flag candidate ' + (c.position + 1));
    flag.append(new Option('⚑ flag…', ''), ...FLAGS.map((f) => new Option(f, f)));
    flag.addEventListener('click', (e) => e.stopPropagation());
    flag.addEventListener('change', async () => {
      const f = flag.value;
      if (!f) return;
      try {
        await api('POST', '/api/candidates/' + c.id + '/flags', {flag: f, on: true});
        status('⚑ Candidate ' + (c.position + 1) + ' flagged as ' + f + ' for the operators.');
      } catch (e) { status('Not flagged: ' + e.message); }
    });
    li.append(no, badge, text, flag);
    li.addEventListener('click', () => { sel = rank; render(); });
    li.addEventListener('dragstart', (e) => { e.dataTransfer.setData('text/plain', String(rank)); });
    li.addEventListener('dragover', (e) => e.preventDefault());
    li.addEventListener('drop', (e) => { e.preventDefault(); move(Number(e.dataTransfer.getData('text/plain')), rank); });
    list.append(li);
  });
}
function move(from, to) {
  if (to < 0 || to >= order.length || from === to) return;
  const [x] = order.splice(from, 1);
  order.splice(to, 0, x);
  sel = to;
  render();
}
function show(next) {
  item = next;
  const mine = item && item.my_ranking;
  order = item ? (mine && mine.order.length ? mine.order.slice() : item.candidates.map((c) => c.id)) : [];
  $('.pg-allbad').checked = !!(mine && mine.all_bad);
  sel = 0; placed = 0;
  render();
}
// Loads can overlap (sign-in, set picker, revisit); only the newest one may change the screen, and
// data-busy tells scripts (and tests) when the widget has settled.
let loadSeq = 0;
async function load(fetchItem, describe, done) {
  const seq = ++loadSeq;
  root.dataset.busy = '1';
  try {
    const next = await fetchItem();
    if (seq !== loadSeq) return;
    if (!next || next.done) { show(null); status((done ? done + ' ' : '') + 'Nothing left to rank. Thank you!'); return; }
    show(next);
    status(describe(next));
    root.focus({preventScroll: true});
  } catch (e) {
    if (seq === loadSeq) { show(null); status(e.message); }
  } finally {
    if (seq === loadSeq) root.dataset.busy = '0';
  }
}
const sizes = {};  // set id -> number of items, for "Item 2 of 5"
function where(next) {
  const n = sizes[next.set_id];
  return 'Item ' + (next.position + 1) + (n ? ' of ' + n : '') + ' in "' + next.set_name + '"';
}
function loadNext(done) {
  const set = $('.pg-set').value;
  return load(() => api('GET', '/api/rankings/next' + (set ? '?set_id=' + encodeURIComponent(set) : '')),
              (next) => (done ? done + ' Next: ' : '') + where(next), done);
}
function revisit(id) {
  return load(() => api('GET', '/api/rankings/items/' + id),
              () => 'Revisiting an item you submitted; Enter saves the change.');
}
async function loadSets() {
  try {
    const sets = await api('GET', '/api/ranking-sets');
    const pick = $('.pg-set');
    const keep = pick.value;
    pick.replaceChildren(new Option('all sets', ''));
    sets.forEach((s) => { sizes[s.id] = s.items; });
    sets.forEach((s) => pick.append(new Option(s.name + ' (' + s.items + ' items, K=' + s.k + ')', String(s.id))));
    pick.value = keep;
  } catch (e) {}
}
async function loadMine() {
  try {
    const mine = await api('GET', '/api/rankings/mine');
    const pick = $('.pg-mine');
    pick.replaceChildren(new Option('revisit my rankings...', ''));
    mine.slice(0, 50).forEach((r) => pick.append(new Option(
      (r.skipped ? '[skipped] ' : r.all_bad ? '[all bad] ' : '') + r.prompt.slice(0, 60) + ' (rev ' + r.revision + ')', String(r.item_id))));
  } catch (e) {}
}
async function submit(skipped) {
  if (!item) return;
  const body = skipped ? {skipped: true} : {order: order, all_bad: $('.pg-allbad').checked};
  try {
    const res = await api('POST', '/api/rankings/items/' + item.item_id, body);
    history.push(item.item_id);
    loadMine();
    // The confirmation stays on screen with the next item's position (it is not replaced by it).
    const done = skipped ? 'Skipped ' + where(item) + '.' : '✓ Saved your ranking of ' + where(item)
      + (res.revision > 1 ? ' (revision ' + res.revision + ')' : '') + '.';
    status(done + ' Loading the next item...');
    await loadNext(done);
    root.dataset.saved = String(Number(root.dataset.saved || 0) + 1);
  } catch (e) { status('Not saved: ' + e.message); }
}
async function start() {
  const me = await fetch('/api/me', {credentials: 'same-origin'});
  if (!me.ok) { loadSeq++; root.dataset.busy = '0'; show(null); status('Log in above to start ranking.'); return; }
  await loadSets();
  await loadNext();
  loadMine();
}

$('.pg-submit').onclick = () => submit(false);
$('.pg-skip').onclick = () => submit(true);
$('.pg-set').onchange = () => loadNext();
$('.pg-mine').onchange = async () => {
  const id = $('.pg-mine').value;
  if (id) revisit(id);
};
$('.pg-prev').onclick = async () => {
  const id = history.pop();
  if (id === undefined) { status('No earlier item in this session.'); return; }
  revisit(id);
};
$('.pg-guide-btn').onclick = async () => {
  const g = $('.pg-guide');
  if (g.hidden) { try { g.textContent = (await api('GET', '/api/guidelines')).text; } catch (e) { g.textContent = e.message; } }
  g.hidden = !g.hidden;
};
document.addEventListener('keydown', (e) => {
  if (!item || root.offsetParent === null) return;  // not on screen
  const t = e.target;
  if (t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName))) return;
  if (/^[1-9]$/.test(e.key)) {
    const cid = (item.candidates.find((c) => c.position === Number(e.key) - 1) || {}).id;
    if (cid === undefined) return;
    if (placed >= order.length) placed = 0;
    move(order.indexOf(cid), placed);
    sel = order.indexOf(cid); placed += 1; render();
  } else if (e.key === 'ArrowUp') { move(sel, sel - 1); }
  else if (e.key === 'ArrowDown') { move(sel, sel + 1); }
  else if (e.key === 'Enter') { submit(false); }
  else return;
  e.preventDefault();
});
window.addEventListener('pg-auth', start);
start();
"""


def build_ranking_widget() -> gr.HTML:
    return gr.HTML(SKELETON, css_template=CSS, js_on_load=JS, elem_classes=["pg-rank-block"])
