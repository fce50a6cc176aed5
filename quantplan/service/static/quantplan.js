// QuantPlan web UI: progressive enhancement only. Every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // the leaderboard's filter and plot controls apply as soon as they change (without JS: the Apply button)
  const filters = document.getElementById("filters");
  if (filters) {
    filters.querySelectorAll("select, input[type=checkbox]").forEach((el) =>
      el.addEventListener("change", () => filters.requestSubmit()));
  }
  // copy buttons beside the commands
  document.querySelectorAll("button.copy").forEach((button) => {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (e) {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        window.getSelection().removeAllRanges();
        window.getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  });
});
