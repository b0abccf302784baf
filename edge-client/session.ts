// A training session with the cloud: Hello → Welcome opens it, SessionOpen reattaches it
// after a reconnect (the cloud restarted, or the network dropped), SessionClose ends it.
import { DEFAULT_LIMITS, PROTOCOL_VERSION, SUPPORTED_VERSIONS, envelope, intersectLimits } from '../protocol/index.ts';
import { checkDefenseEcho } from './defense-echo.ts';
import type { Body, CloseReason, CodecSpec, Defense, Envelope, Limits, MiddleAdapterSpec, ModelDescription, TrainingSpec, Welcome } from '../protocol/index.ts';
import type { Cut } from '../model/index.ts';
import { CloudConnection } from './connection.ts';
import type { ConnectionOptions, ConnectionStats } from './connection.ts';
import { CloudRest, defaultCacheDir, downloadEdgePart } from './download.ts';
import type { EdgePart } from './download.ts';
import { EdgeError } from './errors.ts';
import { RemoteMiddle } from './remote-middle.ts';
import type { MiddleChannel, RemoteMiddleOptions } from './remote-middle.ts';

export const CLIENT_BUILD = `tandem-edge/${PROTOCOL_VERSION.major}.${PROTOCOL_VERSION.minor}`;

export interface SessionSpec {
  model: { id: string; contentHash: string };
  cut: Cut;
  /** Codecs the edge offers per direction, most preferred first. */
  codecs: { forward: CodecSpec[]; backward: CodecSpec[] };
  /** PEFT method names trained on the edge (informational for the cloud). */
  methods?: string[];
  limits?: Partial<Limits>;
  allowNonFinite?: boolean;
  /** v1.1: the privacy defenses the edge applies, offered in Hello (refused there when unknown). */
  defenses?: Defense[];
  /** v1.3: the adapter the cloud creates and trains on the middle blocks for this session. */
  middleAdapter?: MiddleAdapterSpec;
}

export type ConnectCloudOptions = ConnectionOptions;

/** What connectCloud returns: REST for models and downloads, the data-plane connection for sessions. */
export class CloudClient {
  readonly rest: CloudRest;

  constructor(
    readonly url: string,
    readonly connection: CloudConnection,
    key: string,
    ca?: string,
  ) {
    this.rest = new CloudRest(url, key, undefined, ca);
  }

  models(): Promise<ModelDescription[]> {
    return this.rest.models();
  }

  /** The edge part of a model at a cut, from the cache when it is there. */
  downloadEdge(modelId: string, cut: Cut, cacheDir = defaultCacheDir()): Promise<EdgePart> {
    return downloadEdgePart(this.rest, modelId, cut, cacheDir);
  }

  async openSession(spec: SessionSpec): Promise<EdgeSession> {
    const session = new EdgeSession(this.connection, spec);
    await session.hello();
    return session;
  }

  get stats(): ConnectionStats {
    return this.connection.stats;
  }

  close(): void {
    this.connection.close();
  }
}

/** Connects to a cloud node (REST at `url`, socket.io at the same origin). */
export async function connectCloud(url: string, options: ConnectCloudOptions): Promise<CloudClient> {
  if (typeof options?.key !== 'string' || options.key === '') throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', 'a key is required', { field: 'key' });
  // Several gateways of one cluster: `http://a:7470,http://b:7470`; the next is tried when one is gone.
  const urls = url.split(',').map((u) => u.trim());
  if (urls.length > 16) throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `${urls.length} cloud URLs; at most 16`, { field: 'cloud' });
  for (const u of urls) {
    let parsed: URL;
    try {
      parsed = new URL(u);
    } catch (cause) {
      throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `${JSON.stringify(u.slice(0, 200))} is not a URL`, { field: 'cloud', cause });
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new EdgeError('TANDEM_EDGE_OPTION_INVALID', `the cloud URL must be http(s), got ${parsed.protocol}`, { field: 'cloud' });
  }
  const connection = await CloudConnection.open(urls, options);
  return new CloudClient(connection.currentUrl, connection, options.key, options.ca);
}

export class EdgeSession implements MiddleChannel {
  private welcomeMessage?: Welcome;
  private requestCounter = 0;
  private stepsDone = 0;
  /** Times the session was reattached, and times a new session had to replace it. */
  reattached = 0;
  reopened = 0;

  constructor(
    readonly connection: CloudConnection,
    readonly spec: SessionSpec,
  ) {
    connection.onReattach(() => this.reattach());
  }

  get id(): string {
    return this.welcome.sessionId;
  }

  get welcome(): Welcome {
    if (!this.welcomeMessage) throw new EdgeError('TANDEM_EDGE_SESSION_LOST', 'the session is not open');
    return this.welcomeMessage;
  }

  /**
   * Steps the edge has completed, as its requests show: the edge starts step s (or evaluates
   * after s steps) only once s steps are done. A reattach tells the cloud where training stands.
   */
  get completedStep(): number {
    return this.stepsDone;
  }

  private nextRequestId(): string {
    return `edge-${process.pid}-${++this.requestCounter}`;
  }

  /** Sends a request of this session and returns the reply. */
  request(body: Body, options: { beforeReattach?: boolean } = {}): Promise<Envelope> {
    if (body.case === 'forward' || body.case === 'backward') this.stepsDone = Math.max(this.stepsDone, body.value.step);
    return this.connection.request(envelope(this.nextRequestId(), body), options);
  }

  private helloLimits(): Limits {
    return intersectLimits(this.spec.limits ?? {}, DEFAULT_LIMITS);
  }

  private helloBody(): Body {
    const { spec } = this;
    const training: TrainingSpec = { methods: spec.methods ?? [], cloudMiddleLora: false, middleLoraRank: 0, ...(spec.middleAdapter ? { middleAdapter: spec.middleAdapter } : {}) };
    return {
      case: 'hello',
      value: {
        versions: SUPPORTED_VERSIONS,
        clientBuild: CLIENT_BUILD,
        model: spec.model,
        codecs: spec.codecs,
        limits: this.helloLimits(),
        cut: spec.cut,
        training,
        allowNonFinite: spec.allowNonFinite ?? false,
        ...(spec.defenses && spec.defenses.length > 0 ? { defenses: spec.defenses } : {}),
      },
    };
  }

  private adopt(reply: Envelope, asked: string): Welcome {
    if (reply.body.case !== 'welcome') throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `${asked} was answered by ${reply.body.case}, not welcome`, { field: asked });
    const w = reply.body.value;
    const { cut } = this.spec;
    if (w.cut.bottom !== cut.bottom || w.cut.top !== cut.top) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud welcomed cut (${w.cut.bottom}, ${w.cut.top}); the edge holds (${cut.bottom}, ${cut.top})`, { field: 'welcome.cut' });
    }
    if (w.model.contentHash && w.model.contentHash !== this.spec.model.contentHash) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud serves ${w.model.contentHash}; the edge part is ${this.spec.model.contentHash}`, { field: 'welcome.model' });
    }
    // A choice is one of the offers as offered: parameters too (a cloud raising top-k's fraction
    // would get more of h_B than the user agreed to send). topk_fraction crosses as a float32.
    const same = (a: CodecSpec, b: CodecSpec): boolean => a.codec === b.codec && (a.blockSize ?? 0) === (b.blockSize ?? 0)
      && Math.fround(a.topkFraction ?? 0) === Math.fround(b.topkFraction ?? 0) && a.topkValues === b.topkValues;
    const offered = (list: CodecSpec[], c: CodecSpec) => list.some((s) => same(s, c));
    if (!offered(this.spec.codecs.forward, w.codecs.forward) || !offered(this.spec.codecs.backward, w.codecs.backward)) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud chose codecs ${JSON.stringify(w.codecs.forward)}/${JSON.stringify(w.codecs.backward)}, which the edge did not offer`, { field: 'welcome.codecs' });
    }
    // Non-finite values are the edge's to allow: a cloud that turns the check off could train NaN into the adapter.
    const allowNonFinite = this.spec.allowNonFinite ?? false;
    if (w.allowNonFinite && !allowNonFinite) throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', 'the cloud welcomed non-finite values, which the edge did not allow', { field: 'welcome.allow_non_finite' });
    checkDefenseEcho(this.spec.defenses ?? [], w);
    if (this.spec.middleAdapter !== undefined && w.training.middleAdapter === undefined) {
      throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud (protocol ${w.version.major}.${w.version.minor}) welcomed the session without the middle adapter it was asked to hold`, { field: 'welcome.training.middle_adapter' });
    }
    // The cloud's limits bound what the edge decodes only as far as the edge's own do.
    const adopted: Welcome = { ...w, limits: intersectLimits(w.limits, this.helloLimits()) };
    this.welcomeMessage = adopted;
    this.connection.maxMessageBytes = adopted.limits.maxMessageBytes;
    return adopted;
  }

  /** Hello → Welcome. */
  async hello(options: { beforeReattach?: boolean } = {}): Promise<Welcome> {
    return this.adopt(await this.request(this.helloBody(), options), 'hello');
  }

  /**
   * SessionOpen → Welcome after a reconnect. When the cloud no longer knows the session (its
   * state was lost), a new one is opened: the edge holds every trainable parameter, so
   * nothing the cloud forgot is needed.
   */
  private async reattach(): Promise<void> {
    if (!this.welcomeMessage) return;
    try {
      const reply = await this.request({ case: 'sessionOpen', value: { sessionId: this.id, resumeStep: this.stepsDone } }, { beforeReattach: true });
      this.adopt(reply, 'sessionOpen');
      this.reattached += 1;
    } catch (err) {
      if (!(err instanceof EdgeError) || err.code !== 'TANDEM_EDGE_REMOTE_ERROR') throw err;
      // A new session would start the cloud's middle adapter afresh: its training is lost.
      if (this.spec.middleAdapter !== undefined) throw new EdgeError('TANDEM_EDGE_SESSION_LOST', `the cloud no longer knows the session that holds the middle adapter (${err.message})`, { cause: err });
      try {
        await this.hello({ beforeReattach: true });
        this.reopened += 1;
      } catch (cause) {
        throw new EdgeError('TANDEM_EDGE_SESSION_LOST', `the cloud refused to reattach (${err.message}) and to open a new session`, { cause });
      }
    }
  }

  /** The middle of the model, run by the cloud in this session. */
  middle(options: RemoteMiddleOptions = {}): RemoteMiddle {
    return new RemoteMiddle(this, options);
  }

  /** Tells the cloud the session is over; best effort. */
  async close(reason: CloseReason = 'completed', message = ''): Promise<void> {
    if (!this.welcomeMessage) return;
    await this.connection.notify(envelope(this.nextRequestId(), { case: 'sessionClose', value: { sessionId: this.id, reason, message } }));
  }
}
