// The one way gateways and workers connect to NATS: several servers (a JetStream cluster), a
// name for the server's monitoring, reconnecting for ever (a restarted nats-server comes back).
import { connect } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { ClusterError } from './errors.ts';

/** `urls`: one or more comma-separated server URLs. TANDEM_CLUSTER_NATS_UNREACHABLE when none answers. */
export async function connectNats(urls: string, name: string): Promise<NatsConnection> {
  try {
    return await connect({ servers: urls.split(',').map((u) => u.trim()), name, maxReconnectAttempts: -1, reconnectTimeWait: 250 });
  } catch (cause) {
    throw new ClusterError('TANDEM_CLUSTER_NATS_UNREACHABLE', { url: urls.slice(0, 200), reason: (cause as Error).message }, { cause });
  }
}
