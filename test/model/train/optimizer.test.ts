import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { tf, useBackend } from '../../../model/backend.ts';
import { ModelError } from '../../../model/errors.ts';
import { clipGradNorm } from '../../../model/train/clip.ts';
import { AdamW, Sgd } from '../../../model/train/optimizer.ts';
import { learningRate } from '../../../model/train/schedule.ts';

const GRADS = [
  [0.5, -1.0, 0.25],
  [0.1, 0.3, -2.0],
  [-0.7, 0.0, 1.5],
];

/** torch.optim.AdamW's update, in float64. */
function adamwReference(p0: number[], lr: number, wd: number, b1 = 0.9, b2 = 0.999, eps = 1e-8): number[] {
  const p = [...p0];
  const m = p.map(() => 0);
  const v = p.map(() => 0);
  GRADS.forEach((g, k) => {
    const t = k + 1;
    for (let i = 0; i < p.length; i++) {
      p[i] *= 1 - lr * wd;
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const denom = Math.sqrt(v[i]) / Math.sqrt(1 - b2 ** t) + eps;
      p[i] -= (lr / (1 - b1 ** t)) * (m[i] / denom);
    }
  });
  return p;
}

/** torch.optim.SGD with momentum and weight decay, in float64. */
function sgdReference(p0: number[], lr: number, mu: number, wd: number, nesterov: boolean): number[] {
  const p = [...p0];
  let buf: number[] | undefined;
  for (const g0 of GRADS) {
    const g = g0.map((x, i) => x + wd * p[i]);
    buf = buf ? buf.map((b, i) => mu * b + g[i]) : [...g];
    const d = nesterov ? g.map((x, i) => x + mu * (buf as number[])[i]) : buf;
    for (let i = 0; i < p.length; i++) p[i] -= lr * d[i];
  }
  return p;
}

function run(opt: AdamW | Sgd, p0: number[], lr: number, grads: number[][] = GRADS): number[] {
  const p = tf.variable(tf.tensor1d(p0), true);
  const params = new Map([['w', p]]);
  for (const g of grads) {
    const grad = tf.tensor1d(g);
    opt.step(params, new Map([['w', grad]]), lr);
    grad.dispose();
  }
  const out = Array.from(p.dataSync());
  p.dispose();
  opt.dispose();
  return out;
}

function close(actual: number[], expected: number[], tol = 1e-6): void {
  actual.forEach((a, i) => assert.ok(Math.abs(a - expected[i]) <= tol, `[${i}] ${a} vs ${expected[i]}`));
}

describe('optimizers', () => {
  it('AdamW takes PyTorch steps (decoupled decay, bias correction)', async () => {
    await useBackend('cpu');
    // First step by hand: p = 1·(1 − 0.1·0.01) − 0.1 · 0.05 / (√0.00025/√0.001 + 1e-8) = 0.899.
    close(run(new AdamW({ weightDecay: 0.01 }), [1], 0.1, [[0.5]]), [0.899], 1e-6);
    close(run(new AdamW({ weightDecay: 0.01 }), [1, -2, 0.5], 0.1), adamwReference([1, -2, 0.5], 0.1, 0.01));
    close(run(new AdamW({ weightDecay: 0, betas: [0.8, 0.99], eps: 1e-6 }), [1, -2, 0.5], 0.05), adamwReference([1, -2, 0.5], 0.05, 0, 0.8, 0.99, 1e-6));
  });

  it('SGD follows PyTorch momentum and Nesterov semantics', async () => {
    await useBackend('cpu');
    close(run(new Sgd(), [1, -2, 0.5], 0.1), sgdReference([1, -2, 0.5], 0.1, 0, 0, false));
    close(run(new Sgd({ momentum: 0.9, weightDecay: 0.1 }), [1, -2, 0.5], 0.1), sgdReference([1, -2, 0.5], 0.1, 0.9, 0.1, false));
    close(run(new Sgd({ momentum: 0.9, nesterov: true }), [1, -2, 0.5], 0.1), sgdReference([1, -2, 0.5], 0.1, 0.9, 0, true));
  });

  it('state saved mid-run and loaded into a fresh optimizer continues exactly', async () => {
    await useBackend('cpu');
    const straight = run(new AdamW({ weightDecay: 0.01 }), [1, -2, 0.5], 0.1);
    const p = tf.variable(tf.tensor1d([1, -2, 0.5]), true);
    const params = new Map([['w', p]]);
    let opt = new AdamW({ weightDecay: 0.01 });
    GRADS.forEach((g, k) => {
      if (k === 2) {
        const state = opt.state();
        opt.dispose();
        opt = new AdamW({ weightDecay: 0.01 });
        opt.load(state, params);
      }
      const grad = tf.tensor1d(g);
      opt.step(params, new Map([['w', grad]]), 0.1);
      grad.dispose();
    });
    assert.deepEqual(Array.from(p.dataSync()), straight);
    assert.throws(() => new Sgd().load(opt.state(), params), (e: unknown) => e instanceof ModelError && e.code === 'TANDEM_CHECKPOINT_INVALID');
    opt.dispose();
    p.dispose();
  });
});

describe('learning-rate schedules', () => {
  it('match transformers get_*_schedule_with_warmup', () => {
    const base = { lr: 1, warmupSteps: 10, totalSteps: 110 };
    assert.equal(learningRate({ ...base, kind: 'cosine' }, 0), 0);
    assert.equal(learningRate({ ...base, kind: 'cosine' }, 5), 0.5);
    assert.equal(learningRate({ ...base, kind: 'cosine' }, 10), 1);
    assert.ok(Math.abs(learningRate({ ...base, kind: 'cosine' }, 60) - 0.5) < 1e-12);
    assert.ok(Math.abs(learningRate({ ...base, kind: 'cosine' }, 35) - 0.5 * (1 + Math.cos(Math.PI * 0.25))) < 1e-12);
    assert.equal(learningRate({ ...base, kind: 'cosine' }, 110), 0);
    assert.equal(learningRate({ ...base, kind: 'linear' }, 60), 0.5);
    assert.equal(learningRate({ ...base, kind: 'linear' }, 85), 0.25);
    assert.equal(learningRate({ ...base, kind: 'linear' }, 200), 0);
    assert.equal(learningRate({ ...base, kind: 'constant' }, 3), 0.3);
    assert.equal(learningRate({ ...base, kind: 'constant' }, 100), 1);
    assert.equal(learningRate({ kind: 'linear', lr: 2, warmupSteps: 0, totalSteps: 4 }, 0), 2);
  });
});

describe('clipGradNorm', () => {
  it('scales all gradients by maxNorm / (norm + 1e-6) when the global norm exceeds it', async () => {
    await useBackend('cpu');
    const grads = new Map<string, tf.Tensor>([
      ['a', tf.tensor1d([3, 0])],
      ['b', tf.tensor1d([0, 4])],
    ]);
    const norm = clipGradNorm(grads, 1);
    assert.ok(Math.abs(norm - 5) < 1e-6);
    const coef = 1 / (5 + 1e-6);
    close(Array.from(grads.get('a')?.dataSync() ?? []), [3 * coef, 0]);
    close(Array.from(grads.get('b')?.dataSync() ?? []), [0, 4 * coef]);
    // Under the limit nothing changes.
    assert.ok(Math.abs(clipGradNorm(grads, 10) - 1) < 1e-5);
    close(Array.from(grads.get('b')?.dataSync() ?? []), [0, 4 * coef]);
    tf.dispose([...grads.values()]);
  });
});
