// Secure aggregation in the style of SecAgg / SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020):
// updates are quantized to fixed point in the ring Z_{2^32}; each owner adds a self mask and,
// for every other owner of the round, a pairwise mask agreed by X25519 and expanded by
// AES-256-CTR. Pairwise masks cancel in the sum; self masks are removed with Shamir shares of
// their seeds, and an owner that drops out after sharing is recovered from shares of its
// masking key. The server sees only masked vectors and the sum.
import { createCipheriv, createDecipheriv, createHash, createPrivateKey, createPublicKey, diffieHellman, randomBytes } from 'node:crypto';
import { FederationError } from './errors.ts';
import { combineShares, splitSecret } from './shamir.ts';
import type { Share } from './shamir.ts';

export const SECAGG_RING_BITS = 32;
export const DEFAULT_FRACTION_BITS = 16;

// ---------- fixed point in Z_{2^32} ----------

/** The largest |x| an input may have so that the sum of `owners` inputs does not wrap. */
export function fixedPointBound(owners: number, fractionBits = DEFAULT_FRACTION_BITS): number {
  return 2 ** (SECAGG_RING_BITS - 1 - fractionBits) / owners;
}

/** Rounds to the fixed-point step 2^-fractionBits and maps into Z_{2^32} (two's complement). */
export function quantize(values: Float32Array, owners: number, fractionBits = DEFAULT_FRACTION_BITS): Uint32Array {
  checkFractionBits(fractionBits);
  const bound = fixedPointBound(owners, fractionBits);
  const scale = 2 ** fractionBits;
  const out = new Uint32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v) || Math.abs(v) >= bound) {
      throw new FederationError('TANDEM_FED_SECAGG_INVALID', `value ${v} at ${i} is outside ±${bound}, the fixed-point range for ${owners} owners`, { field: `update[${i}]`, details: { bound } });
    }
    out[i] = Math.round(v * scale) >>> 0;
  }
  return out;
}

/** Decodes a ring vector (a single input or a sum) back to floats. */
export function dequantize(ring: Uint32Array, fractionBits = DEFAULT_FRACTION_BITS): Float32Array {
  checkFractionBits(fractionBits);
  const scale = 2 ** fractionBits;
  return Float32Array.from(ring, (v) => (v | 0) / scale);
}

function checkFractionBits(bits: number): void {
  if (!Number.isInteger(bits) || bits < 1 || bits > 24) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `fractionBits must be an integer in 1..24, got ${bits}`, { field: 'fractionBits' });
}

export function addInto(acc: Uint32Array, x: Uint32Array, sign: 1 | -1 = 1): void {
  if (acc.length !== x.length) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `masked vector has ${x.length} values, expected ${acc.length}`, { field: 'masked' });
  if (sign === 1) for (let i = 0; i < acc.length; i++) acc[i] = (acc[i] + x[i]) >>> 0;
  else for (let i = 0; i < acc.length; i++) acc[i] = (acc[i] - x[i]) >>> 0;
}

// ---------- CSPRNG and keys ----------

/** `length` words of AES-256-CTR keystream under SHA-256(seed ‖ label). */
export function expandMask(seed: Uint8Array, label: string, length: number): Uint32Array {
  const key = createHash('sha256').update(seed).update('\0').update(label).digest();
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  const stream = Buffer.concat([cipher.update(Buffer.alloc(length * 4)), cipher.final()]);
  const out = new Uint32Array(length);
  for (let i = 0; i < length; i++) out[i] = stream.readUInt32LE(i * 4);
  return out;
}

const X25519_PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const X25519_SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

/** A fresh 32-byte X25519 private key. */
export function newPrivateKey(): Uint8Array {
  return Uint8Array.from(randomBytes(32));
}

export function publicKeyOf(privateKey: Uint8Array): Uint8Array {
  const key = createPrivateKey({ key: Buffer.concat([X25519_PKCS8_PREFIX, privateKey]), format: 'der', type: 'pkcs8' });
  const der = createPublicKey(key).export({ format: 'der', type: 'spki' });
  return Uint8Array.from(der.subarray(der.length - 32));
}

/** The X25519 shared secret of (mine, theirs), hashed with a label. */
export function agree(privateKey: Uint8Array, peerPublic: Uint8Array, label: string): Uint8Array {
  if (privateKey.length !== 32 || peerPublic.length !== 32) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'X25519 keys are 32 bytes', { field: 'publicKey' });
  let secret: Buffer;
  try {
    secret = diffieHellman({
      privateKey: createPrivateKey({ key: Buffer.concat([X25519_PKCS8_PREFIX, privateKey]), format: 'der', type: 'pkcs8' }),
      publicKey: createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, peerPublic]), format: 'der', type: 'spki' }),
    });
  } catch (cause) {
    throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'X25519 key agreement failed', { field: 'publicKey', cause });
  }
  return Uint8Array.from(createHash('sha256').update(secret).update('\0').update(label).digest());
}

// ---------- the protocol's messages ----------

export interface SecAggParams {
  /** A unique label of the round (federation id and round number): masks never repeat across rounds. */
  round: string;
  /** Values per input. */
  length: number;
  /** Shamir threshold: shares needed to recover a seed; also the fewest owners that may finish. */
  threshold: number;
  /** Owners sampled for the round (fixes the fixed-point range). */
  owners: number;
  fractionBits?: number;
}

export interface AdvertisedKeys {
  owner: string;
  /** Key for encrypting shares (never revealed), base64. */
  cipherPublic: string;
  /** Key for pairwise masks (revealed only if the owner drops out), base64. */
  maskPublic: string;
}

export interface EncryptedShare {
  from: string;
  to: string;
  /** base64 of nonce(12) ‖ ciphertext ‖ tag(16). */
  box: string;
}

/** What a surviving owner reveals after the masked inputs are in. */
export interface RevealedShares {
  owner: string;
  /** Shares of survivors' self-mask seeds, by owner. */
  selfMask: Record<string, Share>;
  /** Shares of dropped owners' mask private keys, by owner. */
  maskKey: Record<string, Share>;
}

interface SharePlain {
  selfMask: Share;
  maskKey: Share;
}

const b64 = (x: Uint8Array): string => Buffer.from(x).toString('base64');
function fromB64(s: unknown, bytes: number, field: string): Uint8Array {
  if (typeof s !== 'string' || s.length > 4 * Math.ceil(bytes / 3) + 4) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `${field} must be base64 of ${bytes} bytes`, { field });
  const out = Uint8Array.from(Buffer.from(s, 'base64'));
  if (out.length !== bytes) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `${field} must be base64 of ${bytes} bytes, got ${out.length}`, { field });
  return out;
}

function checkParams(p: SecAggParams): void {
  if (!Number.isInteger(p.length) || p.length < 1 || p.length > 1 << 28) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'length must be an integer in 1..2^28', { field: 'length' });
  if (!Number.isInteger(p.owners) || p.owners < 2 || p.owners > 10_000) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'secure aggregation needs 2..10000 owners', { field: 'owners' });
  if (!Number.isInteger(p.threshold) || p.threshold < 2 || p.threshold > p.owners) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `threshold must be an integer in 2..${p.owners}`, { field: 'threshold' });
}

function pairSign(me: string, other: string): 1 | -1 {
  return me < other ? 1 : -1;
}

function pairLabel(p: SecAggParams, a: string, b: string): string {
  return `${p.round}|pair|${a < b ? a : b}|${a < b ? b : a}`;
}

/** One owner's side of a SecAgg round. */
export class SecAggOwner {
  readonly owner: string;
  readonly params: SecAggParams;
  private readonly cipherKey = newPrivateKey();
  private readonly maskKey = newPrivateKey();
  private readonly selfSeed = Uint8Array.from(randomBytes(32));
  private peers = new Map<string, AdvertisedKeys>();
  private received = new Map<string, SharePlain>();

  constructor(owner: string, params: SecAggParams) {
    checkParams(params);
    this.owner = owner;
    this.params = params;
  }

  /** Step 1: the two public keys. */
  advertise(): AdvertisedKeys {
    return { owner: this.owner, cipherPublic: b64(publicKeyOf(this.cipherKey)), maskPublic: b64(publicKeyOf(this.maskKey)) };
  }

  /** Step 2: given every advertised owner (itself included), Shamir shares of the seeds, encrypted per recipient. */
  shareKeys(advertised: readonly AdvertisedKeys[]): EncryptedShare[] {
    const sorted = [...advertised].sort((a, b) => (a.owner < b.owner ? -1 : a.owner > b.owner ? 1 : 0));
    if (sorted.length < this.params.threshold) throw new FederationError('TANDEM_FED_SECAGG_BELOW_THRESHOLD', `${sorted.length} owners advertised keys, the threshold is ${this.params.threshold}`, { field: 'owners' });
    if (!sorted.some((a) => a.owner === this.owner)) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'the advertised keys do not include this owner', { field: 'owners' });
    this.peers = new Map(sorted.map((a) => [a.owner, a]));
    if (this.peers.size !== sorted.length) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'an owner advertised twice', { field: 'owners' });
    const n = sorted.length;
    const selfShares = splitSecret(this.selfSeed, n, this.params.threshold);
    const keyShares = splitSecret(this.maskKey, n, this.params.threshold);
    return sorted.map((peer, i) => {
      const plain: SharePlain = { selfMask: selfShares[i], maskKey: keyShares[i] };
      return { from: this.owner, to: peer.owner, box: this.seal(peer, JSON.stringify(plain)) };
    });
  }

  /** Step 3: the shares addressed to this owner; then the masked input. */
  maskInput(update: Float32Array, shares: readonly EncryptedShare[]): Uint32Array {
    if (update.length !== this.params.length) throw new FederationError('TANDEM_FED_UPDATE_SHAPE', `update has ${update.length} values, expected ${this.params.length}`, { field: 'update' });
    for (const s of shares) {
      if (s.to !== this.owner || !this.peers.has(s.from)) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `a share from ${s.from} to ${s.to} is not for this owner`, { field: 'shares' });
      this.received.set(s.from, this.open(this.peers.get(s.from)!, s.box));
    }
    const y = quantize(update, this.params.owners, this.params.fractionBits);
    addInto(y, expandMask(this.selfSeed, `${this.params.round}|self`, y.length));
    for (const peer of this.peers.values()) {
      if (peer.owner === this.owner) continue;
      const seed = agree(this.maskKey, fromB64(peer.maskPublic, 32, 'maskPublic'), 'mask');
      addInto(y, expandMask(seed, pairLabel(this.params, this.owner, peer.owner), y.length), pairSign(this.owner, peer.owner));
    }
    return y;
  }

  /** Step 4: shares of survivors' self seeds and of dropped owners' mask keys, never both for one owner. */
  reveal(survivors: readonly string[]): RevealedShares {
    const alive = new Set(survivors);
    if (!alive.has(this.owner)) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'this owner is not among the survivors', { field: 'survivors' });
    const out: RevealedShares = { owner: this.owner, selfMask: {}, maskKey: {} };
    for (const [from, plain] of this.received) {
      if (alive.has(from)) out.selfMask[from] = plain.selfMask;
      else out.maskKey[from] = plain.maskKey;
    }
    return out;
  }

  private boxKey(peer: AdvertisedKeys): Buffer {
    return Buffer.from(agree(this.cipherKey, fromB64(peer.cipherPublic, 32, 'cipherPublic'), 'share-box'));
  }

  private seal(peer: AdvertisedKeys, text: string): string {
    const nonce = randomBytes(12);
    const c = createCipheriv('aes-256-gcm', this.boxKey(peer), nonce);
    c.setAAD(Buffer.from(`${this.params.round}|${this.owner}|${peer.owner}`));
    const body = Buffer.concat([c.update(text, 'utf8'), c.final()]);
    return Buffer.concat([nonce, body, c.getAuthTag()]).toString('base64');
  }

  private open(peer: AdvertisedKeys, box: string): SharePlain {
    const raw = typeof box === 'string' && box.length < 8192 ? Buffer.from(box, 'base64') : Buffer.alloc(0);
    if (raw.length < 29) throw new FederationError('TANDEM_FED_SECAGG_INVALID', 'a share box is shorter than nonce and tag', { field: 'box' });
    try {
      const d = createDecipheriv('aes-256-gcm', this.boxKey(peer), raw.subarray(0, 12));
      d.setAAD(Buffer.from(`${this.params.round}|${peer.owner}|${this.owner}`));
      d.setAuthTag(raw.subarray(raw.length - 16));
      const text = Buffer.concat([d.update(raw.subarray(12, raw.length - 16)), d.final()]).toString('utf8');
      return JSON.parse(text) as SharePlain;
    } catch (cause) {
      throw new FederationError('TANDEM_FED_SECAGG_INVALID', `the share box from ${peer.owner} does not authenticate`, { field: 'box', cause });
    }
  }
}

/**
 * The server's last step: sum the survivors' masked inputs, remove their self masks from the
 * revealed seed shares and the dropped owners' pairwise masks from their reconstructed keys.
 * Returns the plain sum of the survivors' updates (floats).
 */
export function unmaskSum(params: SecAggParams, advertised: readonly AdvertisedKeys[], masked: ReadonlyMap<string, Uint32Array>, revealed: readonly RevealedShares[]): Float32Array {
  checkParams(params);
  const survivors = [...masked.keys()];
  if (survivors.length < params.threshold) throw new FederationError('TANDEM_FED_SECAGG_BELOW_THRESHOLD', `${survivors.length} masked inputs, the threshold is ${params.threshold}`, { field: 'survivors' });
  const alive = new Set(survivors);
  const keys = new Map(advertised.map((a) => [a.owner, a]));
  for (const s of survivors) if (!keys.has(s)) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `owner ${s} sent a masked input without advertising keys`, { field: 'masked' });
  const dropped = [...keys.keys()].filter((o) => !alive.has(o));
  const sum = new Uint32Array(params.length);
  for (const y of masked.values()) addInto(sum, y);
  const reveals = revealed.filter((r) => alive.has(r.owner));
  for (const s of survivors) {
    const shares = reveals.map((r) => r.selfMask[s]).filter((x): x is Share => x !== undefined);
    const seed = combineShares(shares, params.threshold);
    addInto(sum, expandMask(seed, `${params.round}|self`, params.length), -1);
  }
  for (const d of dropped) {
    const shares = reveals.map((r) => r.maskKey[d]).filter((x): x is Share => x !== undefined);
    const key = combineShares(shares, params.threshold);
    if (b64(publicKeyOf(key)) !== keys.get(d)!.maskPublic) throw new FederationError('TANDEM_FED_SECAGG_INVALID', `the reconstructed mask key of ${d} does not match its public key`, { field: 'maskKey' });
    for (const s of survivors) {
      const seed = agree(key, fromB64(keys.get(s)!.maskPublic, 32, 'maskPublic'), 'mask');
      // s added sign(s, d)·mask; remove it.
      addInto(sum, expandMask(seed, pairLabel(params, s, d), params.length), pairSign(s, d) === 1 ? -1 : 1);
    }
  }
  return dequantize(sum, params.fractionBits);
}
