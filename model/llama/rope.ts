import type { ModelConfig } from '../config.ts';

/**
 * Inverse frequencies of the rotary embedding, as transformers computes them, with the
 * llama3 and linear `rope_scaling` variants applied.
 */
export function ropeInverseFrequencies(config: ModelConfig): Float64Array {
  const dim = config.headDim;
  const inv = new Float64Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) inv[i] = 1 / Math.pow(config.ropeTheta, (2 * i) / dim);
  const scaling = config.ropeScaling;
  if (!scaling || scaling.ropeType === 'default') return inv;
  if (scaling.ropeType === 'linear') return inv.map((f) => f / scaling.factor);
  // llama3: long wavelengths are divided by the factor, short ones kept, the band between smoothed.
  const low = scaling.lowFreqFactor ?? 1;
  const high = scaling.highFreqFactor ?? 4;
  const oldContext = scaling.originalMaxPositionEmbeddings ?? 8192;
  const lowFreqWavelen = oldContext / low;
  const highFreqWavelen = oldContext / high;
  return inv.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < highFreqWavelen) return f;
    if (wavelen > lowFreqWavelen) return f / scaling.factor;
    const smooth = (oldContext / wavelen - low) / (high - low);
    return (1 - smooth) * (f / scaling.factor) + smooth * f;
  });
}

/** cos and sin tables [length, headDim] for positions offset..offset+length-1, HF's rotate_half layout. */
export function ropeTables(invFreq: Float64Array, offset: number, length: number): { cos: Float32Array; sin: Float32Array } {
  const half = invFreq.length;
  const dim = half * 2;
  const cos = new Float32Array(length * dim);
  const sin = new Float32Array(length * dim);
  for (let p = 0; p < length; p++) {
    // HF computes the angle in float32; so do we, for the same rounding.
    const pos = Math.fround(offset + p);
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(pos * Math.fround(invFreq[i]));
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      cos[p * dim + i] = c;
      cos[p * dim + i + half] = c;
      sin[p * dim + i] = s;
      sin[p * dim + i + half] = s;
    }
  }
  return { cos, sin };
}
