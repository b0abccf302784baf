// A tiny reader for the YAML our Kubernetes manifests use: documents (---), block maps and
// sequences by indentation, `- key: value` items, `|` block text (blank and # lines kept), quoted
// or plain scalars, and the empty flow forms {} and []. Anything else throws, so a manifest
// cannot drift into a form this test would misread.

type Value = string | number | boolean | null | Value[] | { [k: string]: Value };

interface Line {
  indent: number;
  text: string;
  no: number;
}

function scalar(raw: string, no: number): Value {
  const t = raw.trim();
  if (t === '{}') return {};
  if (t === '[]') return [];
  if (/^".*"$/.test(t)) return JSON.parse(t) as string;
  if (/^'.*'$/.test(t)) return t.slice(1, -1).replace(/''/g, "'");
  if (/^[[{]/.test(t)) throw new Error(`line ${no}: flow collections are not read: ${t}`);
  if (/^-?\d+(\.\d+)?$/.test(t)) return Number(t);
  if (t === 'true' || t === 'false') return t === 'true';
  if (t === 'null' || t === '~' || t === '') return null;
  return t;
}

function block(lines: Line[], at: { i: number }, indent: number): Value {
  const first = lines[at.i];
  if (first.text.startsWith('- ') || first.text === '-') {
    const out: Value[] = [];
    while (at.i < lines.length && lines[at.i].indent === indent && (lines[at.i].text.startsWith('- ') || lines[at.i].text === '-')) {
      const line = lines[at.i];
      const rest = line.text.slice(2);
      if (rest.trim() === '' ) {
        at.i++;
        out.push(block(lines, at, lines[at.i].indent));
      } else if (/^[A-Za-z0-9_.-]+:( |$)/.test(rest)) {
        // A map item: its first key is on the dash's line, the others indented under it.
        lines[at.i] = { indent: indent + 2, text: rest, no: line.no };
        out.push(block(lines, at, indent + 2));
      } else {
        out.push(scalar(rest, line.no));
        at.i++;
      }
    }
    return out;
  }
  const out: { [k: string]: Value } = {};
  while (at.i < lines.length && lines[at.i].indent === indent && !lines[at.i].text.startsWith('- ')) {
    const line = lines[at.i];
    const m = /^([A-Za-z0-9_.-]+):(?: (.*))?$/.exec(line.text);
    if (m === null) throw new Error(`line ${line.no}: not a key: ${line.text}`);
    const [, key, value] = m;
    at.i++;
    if (value === '|') {
      const text: string[] = [];
      while (at.i < lines.length && lines[at.i].indent > indent) {
        const l = lines[at.i++];
        text.push(l.text === '' ? '' : `${' '.repeat(l.indent - indent - 2)}${l.text}`);
      }
      while (text.at(-1) === '') text.pop();
      out[key] = `${text.join('\n')}\n`;
    } else if (value === undefined || value.trim() === '') {
      out[key] = at.i < lines.length && lines[at.i].indent >= indent && (lines[at.i].indent > indent || lines[at.i].text.startsWith('- ')) ? block(lines, at, lines[at.i].indent) : null;
    } else {
      out[key] = scalar(value, line.no);
    }
  }
  return out;
}

/** The documents of a YAML text. */
export function readYamlDocuments(text: string): Value[] {
  return text.split(/^---\s*$/m).map((doc) => {
    const lines: Line[] = [];
    // Inside `|` block text, blank and # lines are text; elsewhere they are skipped.
    let textUnder: number | undefined;
    doc.split('\n').forEach((raw, i) => {
      const indent = raw.length - raw.trimStart().length;
      const blank = raw.trim() === '';
      if (textUnder !== undefined) {
        if (blank || indent > textUnder) {
          lines.push({ indent: blank ? textUnder + 1 : indent, text: raw.trim(), no: i + 1 });
          return;
        }
        textUnder = undefined;
      }
      if (/^\s*(#.*)?$/.test(raw)) return;
      lines.push({ indent, text: raw.trim(), no: i + 1 });
      if (/:\s+\|$/.test(raw)) textUnder = indent;
    });
    if (lines.length === 0) return null;
    const at = { i: 0 };
    const value = block(lines, at, lines[0].indent);
    if (at.i !== lines.length) throw new Error(`line ${lines[at.i].no}: unexpected indentation: ${lines[at.i].text}`);
    return value;
  }).filter((d) => d !== null);
}
