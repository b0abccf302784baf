// The one way gateways and workers connect to NATS: several servers (a JetStream cluster), a
// name for the server's monitoring, reconnecting for ever (a restarted nats-server comes back).
// A process connects as the NATS user of its role (infra/nats/auth.conf: tandem-gateway may
// use the state, tandem-worker only the middle's subjects), with the password from
// TANDEM_NATS_GATEWAY_PASSWORD or TANDEM_NATS_WORKER_PASSWORD, and over TLS when
// TANDEM_NATS_CA names the CA the server's certificate must chain to.
import { readFileSync } from 'node:fs';
import { connect } from '@nats-io/transport-node';
import type { ConnectionOptions, NatsConnection } from '@nats-io/transport-node';
import { ClusterError } from './errors.ts';

export type NatsRole = 'gateway' | 'worker';

/** The inbox prefix of workers' connections (auth.conf lets the worker user subscribe to it only). */
export const WORKER_INBOX_PREFIX = '_INBOX_worker';

/** The environment variable holding a role's NATS password. */
export function natsPasswordVariable(role: NatsRole): string {
  return `TANDEM_NATS_${role.toUpperCase()}_PASSWORD`;
}

/** What a role connects with, from the environment: no password set means a server without users (a developer's). */
export function natsCredentials(role: NatsRole, env: NodeJS.ProcessEnv = process.env): Pick<ConnectionOptions, 'user' | 'pass' | 'tls'> {
  const pass = env[natsPasswordVariable(role)];
  const ca = env.TANDEM_NATS_CA;
  let tls: ConnectionOptions['tls'];
  if (ca !== undefined && ca !== '') {
    try {
      tls = { ca: readFileSync(ca, 'utf8') };
    } catch (cause) {
      throw new ClusterError('TANDEM_CLUSTER_NATS_UNREACHABLE', { url: `TANDEM_NATS_CA=${ca.slice(0, 200)}`, reason: `the CA file cannot be read: ${(cause as Error).message}` }, { cause });
    }
  }
  return { ...(pass === undefined || pass === '' ? {} : { user: `tandem-${role}`, pass }), ...(tls === undefined ? {} : { tls }) };
}

/** `urls`: one or more comma-separated server URLs. TANDEM_CLUSTER_NATS_UNREACHABLE when none answers or the server refuses the role's user. */
export async function connectNats(urls: string, name: string, role: NatsRole): Promise<NatsConnection> {
  const credentials = natsCredentials(role);
  try {
    // A worker's replies come to an inbox prefix of its own: it may not listen on the gateways' inboxes.
    const inboxPrefix = role === 'worker' ? WORKER_INBOX_PREFIX : undefined;
    return await connect({ servers: urls.split(',').map((u) => u.trim()), name, maxReconnectAttempts: -1, reconnectTimeWait: 250, ...credentials, ...(inboxPrefix === undefined ? {} : { inboxPrefix }) });
  } catch (cause) {
    throw new ClusterError('TANDEM_CLUSTER_NATS_UNREACHABLE', { url: urls.slice(0, 200), reason: (cause as Error).message }, { cause });
  }
}
