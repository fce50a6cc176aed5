// QuantPlan web UI: progressive enhancement only. Every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // the leaderboard's filter and plot controls apply as soon as they change (without JS: the Apply button)
  const filters = document.getElementById("filters");
  if (filters) {
    filters.querySelectorAll("select, input[type=checkbox]").forEach((el) =>
      el.addEventListener("change", () => filters.requestSubmit()));
  }
  // a plotted plan and its table row light up together (hover or keyboard focus on either)
  const pair = (id) => document.querySelectorAll(`[data-plan-id="${id}"]`);
  document.querySelectorAll("svg#pareto a.point, #plans tr[data-plan-id]").forEach((el) => {
    const on = () => pair(el.dataset.planId).forEach((x) => x.classList.add("hot"));
    const off = () => pair(el.dataset.planId).forEach((x) => x.classList.remove("hot"));
    ["mouseenter", "focusin"].forEach((e) => el.addEventListener(e, on));
    ["mouseleave", "focusout"].forEach((e) => el.addEventListener(e, off));
  });
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
