// The three-node NATS cluster of infra/nats as deployed (its files, with ports, the store and the
// route certificates' folder moved for the test): the routes are mutual TLS with the cluster's
// CA, so the three servers form a JetStream cluster, and a server that can reach the route port
// without such a certificate (none, or one of another CA) joins nothing: what its clients
// publish reaches no subscriber of the cluster.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connect } from '@nats-io/transport-node';
import type { NatsConnection } from '@nats-io/transport-node';
import { Kvm } from '@nats-io/kv';
import { freePort, NATS_SERVER, natsPasswords, waitReady } from './nats-server.ts';
import { makeRouteCertificates, withRouteCertificates } from './route-certs.ts';
import type { RouteCertificates } from './route-certs.ts';

const INFRA_NATS = join(import.meta.dirname, '..', '..', 'infra', 'nats');

let work: string;
let certs: RouteCertificates;
const children: ChildProcess[] = [];
const connections: NatsConnection[] = [];
let clientPorts: number[];
let routePorts: number[];

async function startServer(config: string, port: number): Promise<{ child: ChildProcess; log: () => string }> {
  const child = spawn(NATS_SERVER, ['-c', config], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(child);
  let log = '';
  child.stderr?.on('data', (d: Buffer) => { log += d.toString(); });
  await waitReady(child, port);
  return { child, log: () => log };
}

before(async () => {
  work = await mkdtemp(join(tmpdir(), 'tandem-nats-routes-'));
  certs = await makeRouteCertificates(work);
  // The servers read the users' passwords from this process's environment (auth.conf).
  natsPasswords();
  clientPorts = [await freePort(), await freePort(), await freePort()];
  routePorts = [await freePort(), await freePort(), await freePort()];
  // infra/nats as it is, in a folder of its own: auth.conf as is, route-tls.conf with the test's certificates.
  const conf = join(work, 'conf');
  await mkdir(conf);
  await copyFile(join(INFRA_NATS, 'auth.conf'), join(conf, 'auth.conf'));
  await writeFile(join(conf, 'route-tls.conf'), await withRouteCertificates(join(INFRA_NATS, 'route-tls.conf'), certs));
  for (const i of [0, 1, 2]) {
    let text = await readFile(join(INFRA_NATS, `cluster-${i}.conf`), 'utf8');
    const moves: [string, string][] = [
      ['listen: 0.0.0.0:4222', `listen: 127.0.0.1:${clientPorts[i]}`],
      ['listen: 0.0.0.0:6222', `listen: 127.0.0.1:${routePorts[i]}`],
      ['store_dir: "/var/lib/tandem/nats"', `store_dir: ${JSON.stringify(join(work, `js-${i}`))}`],
      ...[0, 1, 2].map((j): [string, string] => [`nats-route://tandem-nats-${j}:6222`, `nats-route://127.0.0.1:${routePorts[j]}`]),
    ];
    for (const [from, to] of moves) {
      assert.ok(text.includes(from), `cluster-${i}.conf has ${from}`);
      text = text.replaceAll(from, to);
    }
    await writeFile(join(conf, `cluster-${i}.conf`), text);
  }
  await Promise.all([0, 1, 2].map((i) => startServer(join(conf, `cluster-${i}.conf`), clientPorts[i])));
});

after(async () => {
  for (const nc of connections) await nc.close().catch(() => undefined);
  for (const child of children) if (child.exitCode === null) child.kill('SIGKILL');
  await rm(work, { recursive: true, force: true });
});

async function gatewayConnection(port: number): Promise<NatsConnection> {
  const nc = await connect({ servers: `nats://127.0.0.1:${port}`, user: 'tandem-gateway', pass: natsPasswords().gateway, maxReconnectAttempts: 0 });
  connections.push(nc);
  return nc;
}

describe('the NATS cluster of infra/nats', () => {
  it('forms over mutual TLS: a bucket with three replicas is written on one server and read on another', async () => {
    const first = await gatewayConnection(clientPorts[0]);
    const third = await gatewayConnection(clientPorts[2]);
    // Three replicas need all three servers in one JetStream cluster (its meta leader elected over the routes).
    let kv;
    for (let attempt = 0; ; attempt++) {
      try {
        kv = await new Kvm(first).create('route-test', { replicas: 3, history: 1 });
        break;
      } catch (error) {
        if (attempt >= 120) throw error; // 30 s for the meta leader on a slow machine
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    await kv.put('k', 'over the routes');
    const other = await new Kvm(third).open('route-test');
    assert.equal((await other.get('k'))?.string(), 'over the routes');
  });

  for (const intruder of ['no certificate', 'a certificate of another CA'] as const) {
    it(`a server with ${intruder} reaches the route port and joins nothing`, async () => {
      const port = await freePort();
      const routePort = await freePort();
      const tls = intruder === 'no certificate' ? '' : `tls { cert_file: ${JSON.stringify(certs.intruderCert)}, key_file: ${JSON.stringify(certs.intruderKey)}, ca_file: ${JSON.stringify(certs.ca)}, verify: true },`;
      const config = join(work, `intruder-${port}.conf`);
      // The intruder's own server: no users, the cluster's name, a route to each real server.
      await writeFile(config, [
        `listen: 127.0.0.1:${port}`,
        `server_name: intruder-${port}`,
        `cluster { name: tandem, listen: 127.0.0.1:${routePort}, ${tls} routes: [${routePorts.map((p) => `nats-route://127.0.0.1:${p}`).join(', ')}] }`,
      ].join('\n'));
      const server = await startServer(config, port);
      const inside = await gatewayConnection(clientPorts[0]);
      const seen: string[] = [];
      const sub = inside.subscribe('tandem.middle.>', { callback: (_err, msg) => { seen.push(msg.subject); } });
      await inside.flush();
      const outside = await connect({ servers: `nats://127.0.0.1:${port}`, maxReconnectAttempts: 0 });
      connections.push(outside);
      // The intruder retries its routes every second; it publishes through several of them.
      for (let k = 0; k < 12; k++) {
        outside.publish('tandem.middle.steal', `attempt ${k}`);
        await outside.flush();
        await new Promise((r) => setTimeout(r, 250));
      }
      await inside.flush();
      sub.unsubscribe();
      assert.deepEqual(seen, [], 'nothing the intruder\'s clients publish reaches the cluster');
      assert.match(server.log(), /connect to route|Router connection closed|TLS|handshake/i, `the intruder tried its routes:\n${server.log().slice(-1500)}`);
      // The cluster goes on.
      assert.equal((await (await new Kvm(inside).open('route-test')).get('k'))?.string(), 'over the routes');
    });
  }
});
