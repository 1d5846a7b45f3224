/* LENS atlas: theme, search as you type, random class, concept toggles, cluster graph. */
(function () {
  'use strict';
  var doc = document.documentElement;
  var KEY = 'lens-theme';

  function stored() { try { return localStorage.getItem(KEY); } catch (e) { return null; } }
  function applyTheme(t) {
    if (t === 'light' || t === 'dark') doc.setAttribute('data-theme', t);
    else doc.removeAttribute('data-theme');
  }
  function theme() {
    var t = doc.getAttribute('data-theme');
    if (t) return t;
    return window.matchMedia && matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
  }
  applyTheme(stored());  // before first paint: no flash of the wrong theme

  var root = doc.getAttribute('data-root') || '';
  var current = doc.getAttribute('data-slug');
  var classes = null, waiting = [];

  /* The class list, loaded once: fetch data/classes.json, or data/classes.js where fetch cannot (file://). */
  function withClasses(cb) {
    if (classes) { cb(classes); return; }
    waiting.push(cb);
    if (waiting.length > 1) return;
    function done(list) {
      classes = Array.isArray(list) ? list : [];
      var w = waiting; waiting = [];
      w.forEach(function (f) { f(classes); });
    }
    function viaScript() {
      if (window.LENS_CLASSES) { done(window.LENS_CLASSES); return; }
      var s = document.createElement('script');
      s.src = root + 'data/classes.js';
      s.onload = function () { done(window.LENS_CLASSES); };
      s.onerror = function () { done([]); };
      document.head.appendChild(s);
    }
    if (location.protocol === 'file:' || !window.fetch) { viaScript(); return; }
    fetch(root + 'data/classes.json')
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(done, viaScript);
  }
  function classUrl(slug) { return root + 'classes/' + slug + '/index.html'; }
  function norm(s) { return String(s || '').normalize('NFKD').replace(/[\u0300-\u036f]/g, '').toLowerCase(); }
  function terms(q) { return norm(q).split(/\s+/).filter(Boolean); }
  function matches(ts, hay) {
    for (var i = 0; i < ts.length; i++) if (hay.indexOf(ts[i]) < 0) return false;
    return true;
  }
  function hayOf(c) { return norm([c.name].concat(c.synonyms || [], c.labels || [], [c.id]).join(' ')); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text) e.textContent = text;  // never innerHTML: class names are untrusted text
    if (cls) e.className = cls;
    return e;
  }

  function initTheme() {
    var b = document.getElementById('theme');
    if (!b) return;
    function show() {
      var dark = theme() === 'dark';
      b.textContent = dark ? '☾ Dark' : '☀ Light';
      b.setAttribute('aria-pressed', String(dark));
      b.setAttribute('aria-label', dark ? 'Dark theme (switch to light)' : 'Light theme (switch to dark)');
    }
    b.addEventListener('click', function () {
      var next = theme() === 'dark' ? 'light' : 'dark';
      applyTheme(next);
      try { localStorage.setItem(KEY, next); } catch (e) { /* private mode */ }
      show();
    });
    show();
  }

  function initRandom() {
    var b = document.getElementById('random');
    if (!b) return;
    b.addEventListener('click', function () {
      withClasses(function (list) {
        var ok = list.filter(function (c) { return c.status === 'ok' && c.slug !== current; });
        if (!ok.length) ok = list.filter(function (c) { return c.slug !== current; });
        if (!ok.length) return;
        location.href = classUrl(ok[Math.floor(Math.random() * ok.length)].slug);
      });
    });
  }

  /* Index: filter the server-rendered grid as you type (also from ?q=). */
  function initGrid(input) {
    var grid = document.getElementById('grid');
    var cards = Array.prototype.slice.call(grid.children);
    var shown = document.getElementById('shown');
    var none = document.getElementById('none');
    function filter() {
      var ts = terms(input.value), n = 0;
      cards.forEach(function (c) {
        var hit = matches(ts, c.getAttribute('data-q'));
        c.hidden = !hit;
        if (hit) n++;
      });
      none.hidden = n > 0;
      shown.textContent = ts.length ? 'Showing ' + n + ' of ' + cards.length + ' classes' : '';
    }
    input.addEventListener('input', filter);
    input.form.addEventListener('submit', function (e) {
      e.preventDefault();
      var first = cards.filter(function (c) { return !c.hidden && c.querySelector('a'); })[0];
      if (first) first.querySelector('a').focus();
    });
    var q = new URLSearchParams(location.search).get('q');
    if (q) { input.value = q; }
    if (input.value) filter();
  }

  /* Other pages: suggestions as you type from the class list; Enter opens the index filtered. */
  function initSuggest(input) {
    var box = document.getElementById('suggest');
    function render() {
      var ts = terms(input.value);
      box.textContent = '';
      if (!ts.length) { box.hidden = true; return; }
      withClasses(function (list) {
        if (terms(input.value).join(' ') !== ts.join(' ')) return;
        var hits = list.filter(function (c) { return matches(ts, hayOf(c)); }).slice(0, 8);
        box.textContent = '';
        hits.forEach(function (c) {
          var li = el('li'), a = el('a', c.name);
          a.href = classUrl(c.slug);
          if (c.status !== 'ok') a.appendChild(el('small', ' (failed)'));
          li.appendChild(a); box.appendChild(li);
        });
        if (!hits.length) box.appendChild(el('li', 'No class matches', 'muted'));
        box.hidden = false;
      });
    }
    input.addEventListener('input', render);
    input.addEventListener('focus', function () { withClasses(function () {}); });
    input.form.addEventListener('keydown', function (e) {
      var links = Array.prototype.slice.call(box.querySelectorAll('a'));
      var i = links.indexOf(document.activeElement);
      if (e.key === 'ArrowDown' && links.length) { e.preventDefault(); links[Math.min(i + 1, links.length - 1)].focus(); }
      else if (e.key === 'ArrowUp' && i >= 0) { e.preventDefault(); (i === 0 ? input : links[i - 1]).focus(); }
      else if (e.key === 'Escape') { box.hidden = true; input.focus(); }
    });
    document.addEventListener('click', function (e) { if (!input.form.contains(e.target)) box.hidden = true; });
  }

  function setViz(btn, on) {
    var img = btn.parentNode.querySelector('img');
    img.src = img.getAttribute(on ? 'data-alpha' : 'data-plain');
    btn.parentNode.classList.toggle('alpha', on);
    btn.setAttribute('aria-pressed', String(on));
  }

  function initConcepts() {
    Array.prototype.forEach.call(document.querySelectorAll('.vt'), function (b) {
      b.addEventListener('click', function () { setViz(b, b.getAttribute('aria-pressed') !== 'true'); });
    });
    var all = document.getElementById('vt-all');
    if (all) {
      if (!document.querySelector('.vt')) all.hidden = true;
      all.addEventListener('click', function () {
        var on = all.getAttribute('aria-pressed') !== 'true';
        all.setAttribute('aria-pressed', String(on));
        all.textContent = on ? 'Show plain images' : 'Show transparency maps';
        Array.prototype.forEach.call(document.querySelectorAll('.vt'), function (b) { setViz(b, on); });
      });
    }
    Array.prototype.forEach.call(document.querySelectorAll('.concept'), function (c) {
      var strip = c.querySelector('.crops'), more = c.querySelector('.more');
      if (!strip || !more) return;
      function open(on) {
        strip.classList.toggle('open', on);
        more.setAttribute('aria-expanded', String(on));
        more.textContent = on ? 'Fewer crops' : 'All ' + more.getAttribute('data-n') + ' crops';
      }
      more.addEventListener('click', function () { open(!strip.classList.contains('open')); });
      strip.addEventListener('click', function () { if (!strip.classList.contains('open')) open(true); });
    });
  }

  /* Cluster graph: hover near a dot, or focus the graph and use arrow keys, to see its image. */
  function initCluster() {
    var svg = document.getElementById('cl'), dataEl = document.getElementById('cl-data');
    if (!svg || !dataEl) return;
    var data = JSON.parse(dataEl.textContent), pts = [], m, re = /M([-\d.]+) ([-\d.]+)/g;
    Array.prototype.forEach.call(svg.querySelectorAll('path'), function (p) {
      var d = p.getAttribute('d');
      while ((m = re.exec(d))) pts.push([+m[1], +m[2]]);
    });
    if (!pts.length) return;
    var ring = document.getElementById('cl-cur');
    var panel = document.getElementById('cl-panel');
    var img = panel.querySelector('img'), cap = panel.querySelector('figcaption');
    var cur = -1;
    function show(i) {
      cur = (i + pts.length) % pts.length;
      ring.setAttribute('cx', pts[cur][0]); ring.setAttribute('cy', pts[cur][1]); ring.hidden = false;
      var src = data.images[cur], k = data.concepts[cur];
      if (src) { img.src = data.base + src; img.hidden = false; } else { img.hidden = true; }
      cap.textContent = 'Image ' + (cur + 1) + ' of ' + pts.length + (k === null || k === undefined ? '' : ' · concept ' + k);
    }
    svg.addEventListener('mousemove', function (e) {
      var ctm = svg.getScreenCTM();
      if (!ctm) return;
      var q = new DOMPoint(e.clientX, e.clientY).matrixTransform(ctm.inverse());
      var best = -1, bd = 144;  // within 12 units
      for (var i = 0; i < pts.length; i++) {
        var dx = pts[i][0] - q.x, dy = pts[i][1] - q.y, dd = dx * dx + dy * dy;
        if (dd < bd) { bd = dd; best = i; }
      }
      if (best >= 0 && best !== cur) show(best);
    });
    svg.addEventListener('focus', function () { show(cur < 0 ? 0 : cur); });
    svg.addEventListener('keydown', function (e) {
      if (e.key === 'ArrowRight' || e.key === 'ArrowDown') { e.preventDefault(); show(cur + 1); }
      else if (e.key === 'ArrowLeft' || e.key === 'ArrowUp') { e.preventDefault(); show(cur - 1); }
    });
  }

  function initMistakes() {
    var input = document.getElementById('mfilter');
    if (!input) return;
    var rows = Array.prototype.slice.call(document.querySelectorAll('#pairs > li'));
    var count = document.getElementById('mcount');
    function filter() {
      var ts = terms(input.value), shown = 0;
      rows.forEach(function (li) {
        li.hidden = !matches(ts, norm(li.getAttribute('data-classes')));
        if (!li.hidden) shown++;
      });
      if (count) count.textContent = shown + ' of ' + rows.length + ' pairs';
    }
    var wanted = new URLSearchParams(location.search).get('class');
    if (wanted) input.value = wanted;
    input.addEventListener('input', filter);
    filter();
  }

  document.addEventListener('DOMContentLoaded', function () {
    initTheme();
    initMistakes();
    initRandom();
    var input = document.getElementById('q');
    if (input) (document.getElementById('grid') ? initGrid : initSuggest)(input);
    initConcepts();
    initCluster();
  });
})();
