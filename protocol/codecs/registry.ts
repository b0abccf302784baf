// The closed list of tensor codecs. A codec joins by one entry here and one wire number
// in tensor.proto.
import type { CodecName } from '../messages.ts';
import { bf16Codec } from './bf16.ts';
import type { TensorCodec } from './codec.ts';
import { f16Codec } from './f16.ts';
import { f32Codec } from './f32.ts';
import { int4BlockCodec } from './int4-block.ts';
import { int8BlockCodec } from './int8-block.ts';
import { topkCodec } from './topk.ts';

export const CODECS: Readonly<Record<CodecName, TensorCodec>> = {
  f32: f32Codec,
  f16: f16Codec,
  bf16: bf16Codec,
  'int8-block': int8BlockCodec,
  'int4-block': int4BlockCodec,
  topk: topkCodec,
};

export const CODEC_NAMES: readonly CodecName[] = Object.keys(CODECS) as CodecName[];
