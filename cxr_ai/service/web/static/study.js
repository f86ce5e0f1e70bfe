// Study page: heatmap on/off, which finding's map, and its opacity.
(function () {
  "use strict";
  var on = document.getElementById("heat-on");
  var which = document.getElementById("heat-which");
  var opacity = document.getElementById("opacity");
  var out = document.getElementById("opacity-value");
  if (!on || !which || !opacity) { return; }
  function apply() {
    document.querySelectorAll("img.heat").forEach(function (img) {
      img.hidden = !on.checked || img.dataset.finding !== which.value;
      img.style.opacity = String(Number(opacity.value) / 100);
    });
    out.textContent = opacity.value + " %";
  }
  on.addEventListener("change", apply);
  which.addEventListener("change", apply);
  opacity.addEventListener("input", apply);
  apply();
})();
