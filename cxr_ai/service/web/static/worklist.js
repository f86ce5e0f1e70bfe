// Live worklist: ask the server every few seconds whether anything changed; if so, fetch the
// rows of the current page and swap them in (no full reload, filters and page kept).
(function () {
  "use strict";
  var POLL_MS = 3000;
  var section = document.getElementById("worklist");
  if (!section) { return; }
  var live = document.getElementById("live");
  var version = section.dataset.version;
  var page = new URLSearchParams(window.location.search).get("page") || "1";

  function swapRows(html) {
    var holder = document.createElement("table");
    holder.innerHTML = html;
    var fresh = holder.querySelector("tbody");
    var old = document.getElementById("rows");
    if (!fresh || !old) { return; }
    var known = {};
    old.querySelectorAll("tr[data-job]").forEach(function (tr) { known[tr.dataset.job] = true; });
    fresh.querySelectorAll("tr[data-job]").forEach(function (tr) { if (!known[tr.dataset.job]) { tr.classList.add("fresh"); } });
    old.replaceWith(fresh);
    var p = Number(fresh.dataset.page), n = Number(fresh.dataset.pages);
    document.getElementById("pageinfo").textContent = "page " + p + " of " + n + " · " + fresh.dataset.total + " studies";
    document.getElementById("prev").hidden = p <= 1;
    document.getElementById("next").hidden = p >= n;
    version = fresh.dataset.version;
  }

  function tick() {
    fetch("/api/worklist/version", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/signin?expired=1"); throw new Error("signed out"); }
        return r.json();
      })
      .then(function (data) {
        live.textContent = "live · checked " + new Date().toLocaleTimeString();
        if (data.version === version) { return null; }
        return fetch("/worklist/rows?page=" + encodeURIComponent(page), { credentials: "same-origin" })
          .then(function (r) { return r.text(); }).then(swapRows);
      })
      .catch(function () { live.textContent = "offline · retrying"; })
      .finally(function () { window.setTimeout(tick, POLL_MS); });
  }
  window.setTimeout(tick, POLL_MS);
})();
