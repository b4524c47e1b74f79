// Minimal to-do list: plain DOM, state in one object, persisted to localStorage.
// <ul id="todos"></ul> <form id="new"><input name="title"></form> <span id="left"></span>

const STORAGE_KEY = "todos.v1";

const state = {
  todos: load(),
  filter: "all", // all | open | done
};

function load() {
  try {
    const raw = localStorage.getItem(STORAGE_KEY);
    return raw ? JSON.parse(raw) : [];
  } catch {
    return [];
  }
}

function save() {
  localStorage.setItem(STORAGE_KEY, JSON.stringify(state.todos));
}

function addTodo(title) {
  const text = title.trim();
  if (!text) return;
  state.todos.push({ id: crypto.randomUUID(), title: text, done: false, created: Date.now() });
  save();
  render();
}

function toggle(id) {
  const todo = state.todos.find((t) => t.id === id);
  if (todo) {
    todo.done = !todo.done;
    save();
    render();
  }
}

function remove(id) {
  state.todos = state.todos.filter((t) => t.id !== id);
  save();
  render();
}

function visibleTodos() {
  switch (state.filter) {
    case "open":
      return state.todos.filter((t) => !t.done);
    case "done":
      return state.todos.filter((t) => t.done);
    default:
      return state.todos;
  }
}

function render() {
  const list = document.getElementById("todos");
  list.replaceChildren(
    ...visibleTodos().map((todo) => {
      const li = document.createElement("li");
      li.dataset.id = todo.id;
      li.className = todo.done ? "done" : "";

      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = todo.done;
      box.setAttribute("aria-label", `Mark "${todo.title}" as done`);

      const label = document.createElement("span");
      label.textContent = todo.title; // textContent, never innerHTML: titles are user input

      const del = document.createElement("button");
      del.textContent = "×";
      del.title = "Delete";
      del.className = "delete";

      li.append(box, label, del);
      return li;
    }),
  );
  const left = state.todos.filter((t) => !t.done).length;
  document.getElementById("left").textContent = `${left} item${left === 1 ? "" : "s"} left`;
}

// One listener on the list handles every row (event delegation).
document.getElementById("todos").addEventListener("click", (event) => {
  const li = event.target.closest("li");
  if (!li) return;
  if (event.target.matches("input[type=checkbox]")) toggle(li.dataset.id);
  if (event.target.matches("button.delete")) remove(li.dataset.id);
});

document.getElementById("new").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = event.target.elements.title;
  addTodo(input.value);
  input.value = "";
  input.focus();
});

document.querySelectorAll("[data-filter]").forEach((button) => {
  button.addEventListener("click", () => {
    state.filter = button.dataset.filter;
    render();
  });
});

// Keep several open tabs in sync.
window.addEventListener("storage", (event) => {
  if (event.key === STORAGE_KEY) {
    state.todos = load();
    render();
  }
});

render();
