// Choosing the codecs of a session from what the edge offers and the cloud accepts.
import { ProtocolError } from './errors.ts';
import type { CodecChoice, CodecName, CodecOffer, CodecSpec } from './messages.ts';

/** The cloud's accepted codecs per direction, most preferred first. */
export interface CodecPreferences {
  forward: readonly CodecName[];
  backward: readonly CodecName[];
}

function choose(offered: readonly CodecSpec[], accepted: readonly CodecName[], direction: string): CodecSpec {
  for (const name of accepted) {
    const spec = offered.find((s) => s.codec === name);
    if (spec !== undefined) return { ...spec };
  }
  throw new ProtocolError('TANDEM_PROTO_CODEC_NEGOTIATION_FAILED', { direction, accepted: accepted.join(', ') || 'none' });
}

/** The first accepted codec the edge also offered, per direction; a typed error when there is none. */
export function negotiateCodecs(offer: CodecOffer, preferences: CodecPreferences): CodecChoice {
  return { forward: choose(offer.forward, preferences.forward, 'forward'), backward: choose(offer.backward, preferences.backward, 'backward') };
}
