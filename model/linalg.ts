// Small dense linear algebra on Float64Arrays (row-major), for the few places that need it on
// the CPU: LoRA-FA's projection and the rank-r refactoring of federated LoRA products.

/** Eigen-decomposition of a symmetric [r, r] matrix by cyclic Jacobi: values descending, vectors as columns. */
export function symmetricEigen(s: Float64Array, r: number): { values: Float64Array; vectors: Float64Array } {
  const a = Float64Array.from(s);
  const v = new Float64Array(r * r);
  for (let i = 0; i < r; i++) v[i * r + i] = 1;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let i = 0; i < r; i++) for (let j = i + 1; j < r; j++) off += a[i * r + j] ** 2;
    if (off < 1e-30) break;
    for (let p = 0; p < r; p++) {
      for (let q = p + 1; q < r; q++) {
        const apq = a[p * r + q];
        if (Math.abs(apq) < 1e-300) continue;
        const theta = (a[q * r + q] - a[p * r + p]) / (2 * apq);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const sn = t * c;
        for (let k = 0; k < r; k++) {
          const akp = a[k * r + p];
          const akq = a[k * r + q];
          a[k * r + p] = c * akp - sn * akq;
          a[k * r + q] = sn * akp + c * akq;
        }
        for (let k = 0; k < r; k++) {
          const apk = a[p * r + k];
          const aqk = a[q * r + k];
          a[p * r + k] = c * apk - sn * aqk;
          a[q * r + k] = sn * apk + c * aqk;
        }
        for (let k = 0; k < r; k++) {
          const vkp = v[k * r + p];
          const vkq = v[k * r + q];
          v[k * r + p] = c * vkp - sn * vkq;
          v[k * r + q] = sn * vkp + c * vkq;
        }
      }
    }
  }
  const order = [...Array(r).keys()].sort((i, j) => a[j * r + j] - a[i * r + i]);
  const values = new Float64Array(r);
  const vectors = new Float64Array(r * r);
  order.forEach((src, dst) => {
    values[dst] = a[src * r + src];
    for (let k = 0; k < r; k++) vectors[k * r + dst] = v[k * r + src];
  });
  return { values, vectors };
}
