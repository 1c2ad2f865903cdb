// Run in the console's page by tests/test_console_browser.py: the order and keys the page's
// own modules give a folder picked in the input #probe, and the same folder dropped (entries
// as a browser hands them: unsorted, in chunks). Arguments: the files per request, and the
// callback of Selenium's execute_async_script.
const [size, done] = arguments;
(async () => {
  const files = await import("./files.js");
  const picked = files.filesFromInput(document.getElementById("probe"));
  await files.hashFiles(picked, () => {});
  const keys = [];
  for (let i = 0; i < picked.length; i += size) {
    keys.push(await files.idempotencyKey("bulk", picked.slice(i, i + size), "BATCH-ID"));
  }
  // The same folder dropped: entries as a browser gives them, unsorted and in chunks.
  const tree = { children: new Map() };
  const hidden = new File(["x"], ".DS_Store");
  for (const f of [...picked, { path: "mixed/.DS_Store", file: hidden }]) {
    let node = tree;
    const segments = f.path.split("/");
    for (const segment of segments.slice(0, -1)) {
      if (!node.children.has(segment)) node.children.set(segment, { children: new Map() });
      node = node.children.get(segment);
    }
    node.children.set(segments.at(-1), { file: f.file });
  }
  const entry = (name, node, parent) => {
    const fullPath = `${parent}/${name}`;
    if (node.file) {
      return { isFile: true, isDirectory: false, name, fullPath, file: (ok) => ok(node.file) };
    }
    const kids = [...node.children].reverse().map(([n, c]) => entry(n, c, fullPath));
    const createReader = () => {
      let next = 0;
      return { readEntries: (ok) => setTimeout(() => ok(kids.slice(next, (next += 3)))) };
    };
    return { isFile: false, isDirectory: true, name, fullPath, createReader };
  };
  const top = entry("mixed", tree.children.get("mixed"), "");
  const drop = { items: [{ kind: "file", webkitGetAsEntry: () => top, getAsFile: () => null }] };
  const dropped = await files.filesFromDrop(drop);
  done({paths: picked.map((f) => f.path), dropped: dropped.map((f) => f.path), keys});
})();
