// Second-opinion page: drop a file on the form (or pick one); too-large files are refused here
// before any upload (the server refuses them too, with 413).
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  var input = document.getElementById("file");
  var chosen = document.getElementById("chosen");
  var problem = document.getElementById("client-error");
  if (!form || !input) { return; }
  var max = Number(form.dataset.maxBytes || "0");
  function check() {
    var f = input.files && input.files[0];
    problem.hidden = true;
    chosen.textContent = f ? f.name + " (" + (f.size / 1048576).toFixed(2) + " MB)" : "";
    if (f && max && f.size > max) {
      problem.textContent = f.name + ": the file is " + (f.size / 1048576).toFixed(1) + " MB; the limit is " +
        (max / 1048576).toFixed(1) + " MB. Upload a smaller file.";
      problem.hidden = false;
      return false;
    }
    return !!f;
  }
  input.addEventListener("change", check);
  form.addEventListener("submit", function (e) { if (!check()) { e.preventDefault(); } });
  ["dragenter", "dragover"].forEach(function (t) {
    form.addEventListener(t, function (e) { e.preventDefault(); form.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (t) {
    form.addEventListener(t, function (e) { e.preventDefault(); form.classList.remove("over"); });
  });
  form.addEventListener("drop", function (e) {
    if (!e.dataTransfer || !e.dataTransfer.files.length) { return; }
    input.files = e.dataTransfer.files;
    if (check()) { form.submit(); }
  });
})();
