// The search page: asks the JSON API and draws the result grid. Text from the server is always set
// with textContent (never innerHTML), so file names cannot inject markup.
"use strict";

const form = document.getElementById("search-form");
const queryBox = document.getElementById("query");
const kBox = document.getElementById("k");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

function card(hit) {
  const figure = document.createElement("figure");
  figure.className = "result";
  figure.dataset.id = hit.id;
  figure.dataset.path = hit.path;
  figure.title = "Click to find similar images";
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.path;
  img.loading = "lazy";
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const path = document.createElement("a");
  path.className = "path";
  path.href = hit.image;
  path.target = "_blank";
  path.textContent = hit.path;
  path.addEventListener("click", (event) => event.stopPropagation());  // opens the image, no new search
  caption.append(score, " ", path);
  figure.append(img, caption);
  figure.addEventListener("click", () => run({ id: hit.id }, `images like ${hit.path}`));
  return figure;
}

async function run(params, description) {
  const query = new URLSearchParams({ ...params, k: kBox.value || "24" });
  const url = ("q" in params ? "/api/search?" : "/api/similar?") + query;
  setStatus(`searching ${description}…`);
  grid.setAttribute("aria-busy", "true");
  try {
    const response = await fetch(url);
    const data = await response.json();
    if (!response.ok) {
      setStatus(data.error || `error ${response.status}`, true);
      grid.replaceChildren();
      return;
    }
    grid.replaceChildren(...data.results.map(card));
    setStatus(`${data.results.length} results for ${description} (${data.search} search, ${data.ms} ms)`);
    history.replaceState(null, "", "?" + new URLSearchParams(params));
  } catch (error) {
    setStatus(`the server did not answer: ${error}`, true);
  } finally {
    grid.removeAttribute("aria-busy");
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = queryBox.value.trim();
  if (!text) {
    setStatus("Type a few words first.", true);
    return;
  }
  run({ q: text }, `“${text}”`);
});

// A link such as /?q=a+red+car runs that search when the page opens.
const start = new URLSearchParams(location.search);
if (start.get("q")) {
  queryBox.value = start.get("q");
  run({ q: start.get("q") }, `“${start.get("q")}”`);
} else if (start.get("id")) {
  run({ id: start.get("id") }, `images like #${start.get("id")}`);
}
