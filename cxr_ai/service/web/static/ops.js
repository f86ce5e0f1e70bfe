// Operations page: refresh the panel by short polling (no reload, forms keep working).
(function () {
  "use strict";
  var panel = document.getElementById("ops-panel");
  if (!panel) { return; }
  var every = Math.max(1, Number(panel.dataset.refresh || "15")) * 1000;
  function refresh() {
    fetch("/ops/panel", {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) { if (!r.ok) { throw new Error(String(r.status)); } return r.text(); })
      .then(function (html) { panel.innerHTML = html; })
      .catch(function () { /* keep what is shown; try again later */ })
      .finally(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
})();
