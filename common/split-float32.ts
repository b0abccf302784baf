// One Float32Array cut into consecutive parts of the given lengths (copies, each with its own
// buffer, so that a part can be transferred or kept while the whole is dropped).

export function splitFloat32(all: Float32Array, lengths: readonly number[]): Float32Array[] {
  const parts: Float32Array[] = [];
  let at = 0;
  for (const n of lengths) {
    parts.push(all.slice(at, at + n));
    at += n;
  }
  return parts;
}
