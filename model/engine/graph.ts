// A small builder of ONNX graphs: named values, one call per node, constants deduplicated.
import type { OnnxAttribute, OnnxDim, OnnxGraph, OnnxNode, OnnxTensor, OnnxValueInfo } from './onnx-proto.ts';
import { ATTR_FLOAT, ATTR_INT, ATTR_INTS, ONNX_FLOAT, ONNX_INT64 } from './onnx-proto.ts';

export type AttrValue = number | number[] | { float: number };

function attribute(name: string, v: AttrValue): OnnxAttribute {
  if (Array.isArray(v)) return { name, type: ATTR_INTS, ints: v };
  if (typeof v === 'object') return { name, type: ATTR_FLOAT, f: v.float };
  return { name, type: ATTR_INT, i: v };
}

const bytesOf = (a: Float32Array | BigInt64Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

export class GraphBuilder {
  private readonly nodes: OnnxNode[] = [];
  private readonly initializers: OnnxTensor[] = [];
  private readonly inputs: OnnxValueInfo[] = [];
  private readonly outputs: OnnxValueInfo[] = [];
  private readonly constants = new Map<string, string>();
  private counter = 0;

  constructor(private readonly name: string) {}

  /** A fresh value name with a readable prefix. */
  fresh(prefix: string): string {
    return `${prefix}_${this.counter++}`;
  }

  input(name: string, elemType: number, dims?: OnnxDim[]): string {
    this.inputs.push({ name, elemType, dims });
    return name;
  }

  output(name: string, elemType: number, dims?: OnnxDim[]): void {
    this.outputs.push({ name, elemType, dims });
  }

  /** A float32 initializer (a weight), given once; the bytes are not copied until encoding. */
  weight(name: string, data: Float32Array, dims: number[]): string {
    this.initializers.push({ name, dims, data_type: ONNX_FLOAT, raw_data: bytesOf(data) });
    return name;
  }

  /** An int64 constant (shapes, axes), shared by every node that uses the same values. */
  ints(values: number[]): string {
    const key = `i:${values.join(',')}`;
    let name = this.constants.get(key);
    if (!name) {
      name = this.fresh('ints');
      this.initializers.push({ name, dims: [values.length], data_type: ONNX_INT64, raw_data: bytesOf(BigInt64Array.from(values.map(BigInt))) });
      this.constants.set(key, name);
    }
    return name;
  }

  /** A float32 scalar constant. */
  scalar(value: number): string {
    const key = `f:${value}`;
    let name = this.constants.get(key);
    if (!name) {
      name = this.fresh('scalar');
      this.initializers.push({ name, dims: [], data_type: ONNX_FLOAT, raw_data: bytesOf(Float32Array.of(value)) });
      this.constants.set(key, name);
    }
    return name;
  }

  /** Adds a node; returns its output names (`outputs` of them). */
  node(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}, outputs = 1): string[] {
    const out = Array.from({ length: outputs }, () => this.fresh(opType.toLowerCase()));
    this.nodes.push({ op_type: opType, input: inputs, output: out, attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)) });
    return out;
  }

  /** A single-output node. */
  op(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}): string {
    return this.node(opType, inputs, attrs)[0];
  }

  /** Renames a value to a graph output name (an Identity node). */
  alias(value: string, name: string): string {
    this.nodes.push({ op_type: 'Identity', input: [value], output: [name], attribute: [] });
    return name;
  }

  // Shorthands for the ops the LLaMA graphs use most.
  matmul(a: string, b: string): string {
    return this.op('MatMul', [a, b]);
  }
  add(a: string, b: string): string {
    return this.op('Add', [a, b]);
  }
  sub(a: string, b: string): string {
    return this.op('Sub', [a, b]);
  }
  mul(a: string, b: string): string {
    return this.op('Mul', [a, b]);
  }
  reshape(x: string, shape: number[]): string {
    return this.op('Reshape', [x, this.ints(shape)]);
  }
  transpose(x: string, perm: number[]): string {
    return this.op('Transpose', [x], { perm });
  }
  /** Sum over `axes`, kept as size-1 axes. */
  sumKeep(x: string, axes: number[]): string {
    return this.op('ReduceSum', [x, this.ints(axes)], { keepdims: 1 });
  }
  /** Sum over `axes`, removed. */
  sum(x: string, axes: number[]): string {
    return this.op('ReduceSum', [x, this.ints(axes)], { keepdims: 0 });
  }
  meanKeep(x: string, axes: number[]): string {
    return this.op('ReduceMean', [x], { axes, keepdims: 1 });
  }
  /** x · W^T for a weight W [out, in] (PyTorch's layout) and x [..., in]. */
  linear(x: string, w: string): string {
    return this.op('Gemm', [x, w], { transB: 1 });
  }

  build(): OnnxGraph {
    return { name: this.name, nodes: this.nodes, initializers: this.initializers, inputs: this.inputs, outputs: this.outputs };
  }
}
