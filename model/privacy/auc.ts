// Area under the ROC curve of a score against binary labels (Mann–Whitney U, ties counted half).

/** AUC of `scores` for telling `positive[i]` rows from the rest; 0.5 when one class is empty. */
export function rocAuc(scores: readonly number[], positive: readonly boolean[]): number {
  if (scores.length !== positive.length) throw new RangeError(`rocAuc: ${scores.length} scores, ${positive.length} labels`);
  const order = scores.map((s, i) => ({ s, p: positive[i] })).sort((a, b) => a.s - b.s);
  let nPos = 0;
  let rankSum = 0;
  for (let i = 0; i < order.length; ) {
    let j = i;
    while (j < order.length && order[j].s === order[i].s) j++;
    const rank = (i + 1 + j) / 2; // mean 1-based rank of the tie group
    for (let k = i; k < j; k++) if (order[k].p) {
      nPos++;
      rankSum += rank;
    }
    i = j;
  }
  const nNeg = order.length - nPos;
  if (nPos === 0 || nNeg === 0) return 0.5;
  return (rankSum - (nPos * (nPos + 1)) / 2) / (nPos * nNeg);
}

/** How well the score separates the classes whichever way round the attacker reads it: max(AUC, 1 − AUC). */
export function leakAuc(scores: readonly number[], positive: readonly boolean[]): number {
  const auc = rocAuc(scores, positive);
  return Math.max(auc, 1 - auc);
}
