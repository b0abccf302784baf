// The import graph of the source folders: no cycles (type-only imports included), and the
// folder direction of DESIGN.md (protocol and model independent foundations, emulator on
// model, cloud-node and edge-client apart, cli on top, other folders only through index.ts).
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, it } from 'node:test';

const ROOT = resolve(import.meta.dirname, '..');
const FOLDERS = ['protocol', 'model', 'emulator', 'cloud-node', 'edge-client', 'cli'] as const;
type Folder = (typeof FOLDERS)[number];

/** Which folders each folder may import. */
const ALLOWED: Record<Folder, readonly Folder[]> = {
  protocol: [],
  model: [],
  emulator: ['model'],
  'cloud-node': ['protocol', 'model', 'emulator'],
  'edge-client': ['protocol', 'model', 'emulator'],
  cli: ['protocol', 'model', 'emulator', 'cloud-node', 'edge-client'],
};

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...sourceFiles(path));
    else if (name.endsWith('.ts') && !name.endsWith('.d.ts')) out.push(path);
  }
  return out;
}

/** Relative module specifiers of every import and re-export, `import type` included. */
export function importsOf(source: string): string[] {
  const specs: string[] = [];
  const re = /(?:^|[\s;])(?:import|export)\s+(?:type\s+)?(?:[^'";]*?\s+from\s+)?['"](\.{1,2}\/[^'"]+)['"]|import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/gm;
  for (const m of source.matchAll(re)) specs.push(m[1] ?? m[2]);
  return specs;
}

function graph(): Map<string, string[]> {
  const files = FOLDERS.flatMap((f) => sourceFiles(join(ROOT, f)));
  const known = new Set(files);
  const edges = new Map<string, string[]>();
  for (const file of files) {
    const targets = importsOf(readFileSync(file, 'utf8'))
      .map((s) => resolve(dirname(file), s))
      .filter((t) => known.has(t));
    edges.set(file, targets);
  }
  return edges;
}

/** Strongly connected components with more than one file, or a file importing itself (Tarjan). */
export function cycles(edges: Map<string, string[]>): string[][] {
  let index = 0;
  const order = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string): void => {
    order.set(v, index);
    low.set(v, index++);
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v) ?? []) {
      if (!order.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v) as number, low.get(w) as number));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v) as number, order.get(w) as number));
      }
    }
    if (low.get(v) === order.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop() as string;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      if (component.length > 1 || (edges.get(v) ?? []).includes(v)) found.push(component.sort());
    }
  };
  for (const v of edges.keys()) if (!order.has(v)) visit(v);
  return found;
}

const folderOf = (file: string): Folder => relative(ROOT, file).split('/')[0] as Folder;
const rel = (file: string): string => relative(ROOT, file);

describe('the import graph', () => {
  it('finds a cycle when there is one (the check can fail)', () => {
    const edges = new Map([['a', ['b']], ['b', ['c']], ['c', ['a']], ['d', ['a']]]);
    assert.deepEqual(cycles(edges), [['a', 'b', 'c']]);
    assert.deepEqual(importsOf("import type { X } from './x.ts';\nexport { y } from '../y.ts';\nimport './z.ts';"), ['./x.ts', '../y.ts', './z.ts']);
  });

  it('has no import cycle in the source folders', () => {
    const found = cycles(graph()).map((c) => c.map(rel).join(' → '));
    assert.deepEqual(found, [], `import cycles:\n${found.join('\n')}`);
  });

  it('keeps the folder direction, and other folders import a folder only through its index.ts', () => {
    const wrong: string[] = [];
    for (const [file, targets] of graph()) {
      const from = folderOf(file);
      for (const target of targets) {
        const to = folderOf(target);
        if (to === from) continue;
        if (!ALLOWED[from].includes(to)) wrong.push(`${rel(file)} imports ${rel(target)}: ${from} may not import ${to}`);
        else if (rel(target) !== `${to}/index.ts`) wrong.push(`${rel(file)} imports ${rel(target)}, not ${to}/index.ts`);
      }
    }
    assert.deepEqual(wrong, []);
  });
});
