// The federation math shared by the cloud's coordinator and the edge client.
export { FEDERATION_ERRORS, FederationError } from './errors.ts';
export type { FederationErrorCode, FederationErrorOptions } from './errors.ts';
export { checkFinite, checkSize, flatten, l2Norm, layoutOf, unflatten } from './tensors.ts';
export type { Layout, NamedTensor, TensorSet } from './tensors.ts';
export { AGGREGATORS, aggregate, coordinateMedian, fedAdamStep, fedAvg, trimmedMean } from './aggregate.ts';
export type { AggregatorName, FedAdamOptions, FedAdamState, WeightedUpdate } from './aggregate.ts';
export { averagedProduct, exactLoraAggregate, ffaAggregates, loraAwareDelta, loraPairs, truncatedFactors, zeroLoraA } from './lora.ts';
export type { ExactLoraResult, LoraAwareDelta, LoraPair, WeightedAdapter } from './lora.ts';
export { SHAMIR_PRIME, combineShares, splitSecret } from './shamir.ts';
export type { Share } from './shamir.ts';
export {
  DEFAULT_FRACTION_BITS,
  SECAGG_RING_BITS,
  SecAggOwner,
  addInto,
  agree,
  dequantize,
  expandMask,
  fixedPointBound,
  newPrivateKey,
  publicKeyOf,
  quantize,
  unmaskSum,
} from './secagg.ts';
export type { AdvertisedKeys, EncryptedShare, RevealedShares, SecAggParams } from './secagg.ts';
export { DEFAULT_RDP_ORDERS, RdpAccountant, addGaussianNoise, clipUpdate, epsilonFromRdp, gaussian, logErfc, sampledGaussianRdp, splitNoiseStd } from './dp.ts';
export type { AccountantState, PrivacySpent } from './dp.ts';
export { addProximalGradients, constrainLocalRound, proximalTerm } from './fedprox.ts';
export type { LocalRoundOptions } from './fedprox.ts';
