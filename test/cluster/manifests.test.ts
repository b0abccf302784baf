// The deployment files cannot run here: they must parse, and every `tandem` flag they use
// must exist in the command line's definitions (a renamed flag would break a deployment).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { cloudCommand } from '../../cli/cloud.ts';
import { NATS_SERVER } from './nats-server.ts';
import { readYamlDocuments } from './yaml-subset.ts';

const INFRA = join(import.meta.dirname, '..', '..', 'infra');
const io = { out: () => undefined, log: () => undefined };

type Node = unknown;

interface Container {
  command?: string[];
  args?: string[];
  name: string;
  env?: { name: string; valueFrom?: { secretKeyRef?: { name: string; key: string } } }[];
}

function containers(doc: Node): Container[] {
  const spec = (doc as { spec?: { template?: { spec?: { containers?: unknown[] } } } }).spec?.template?.spec;
  return (spec?.containers ?? []) as Container[];
}

/** nats-server's own check of a configuration file (`-t`), with the environment it reads: the passwords, and the pod name the StatefulSet sets. */
function natsConfigCheck(file: string): { status: number | null; output: string } {
  const r = spawnSync(NATS_SERVER, ['-t', '-c', file], { env: { ...process.env, TANDEM_NATS_GATEWAY_PASSWORD: 'g', TANDEM_NATS_WORKER_PASSWORD: 'w', POD_NAME: 'tandem-nats-0' }, encoding: 'utf8' });
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

describe('infra/', () => {
  it('the Kubernetes manifests parse: NATS with JetStream, gateways and workers', async () => {
    const kinds: string[] = [];
    for (const name of (await readdir(join(INFRA, 'k8s'))).filter((n) => n.endsWith('.yaml'))) {
      for (const doc of readYamlDocuments(await readFile(join(INFRA, 'k8s', name), 'utf8'))) {
        const d = doc as { apiVersion?: string; kind?: string; metadata?: { name?: string } };
        assert.ok(typeof d.apiVersion === 'string' && typeof d.kind === 'string' && typeof d.metadata?.name === 'string', `${name}: apiVersion, kind and metadata.name`);
        kinds.push(`${d.kind}/${d.metadata?.name}`);
      }
    }
    for (const want of ['StatefulSet/tandem-nats', 'Deployment/tandem-gateway', 'Deployment/tandem-worker-2-8', 'Deployment/tandem-worker-8-14', 'Service/tandem-gateway']) assert.ok(kinds.includes(want), `${want} among ${kinds.join(', ')}`);
    for (const want of ['NetworkPolicy/tandem-nats']) assert.ok(kinds.includes(want), `${want} among ${kinds.join(', ')}`);
    const nats = readYamlDocuments(await readFile(join(INFRA, 'k8s', 'nats.yaml'), 'utf8'))[0] as { data: Record<string, string> };
    assert.match(nats.data['nats.conf'], /jetstream \{/);
    assert.equal(nats.data['auth.conf'], await readFile(join(INFRA, 'nats', 'auth.conf'), 'utf8'), 'the ConfigMap carries infra/nats/auth.conf as it is');
    // nats-server itself accepts the ConfigMap's configuration.
    const dir = await mkdtemp(join(tmpdir(), 'tandem-k8s-nats-'));
    try {
      for (const [name, text] of Object.entries(nats.data)) await writeFile(join(dir, name), text);
      const check = natsConfigCheck(join(dir, 'nats.conf'));
      assert.equal(check.status, 0, check.output);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('each Tandem pod gets only its own role\'s NATS password, from the Secret', async () => {
    let pods = 0;
    for (const name of ['gateway.yaml', 'workers.yaml']) {
      for (const doc of readYamlDocuments(await readFile(join(INFRA, 'k8s', name), 'utf8'))) {
        for (const c of containers(doc)) {
          const args = c.args ?? [];
          const role = args[args.indexOf('--role') + 1];
          const env = (c.env ?? []).filter((e) => e.name.startsWith('TANDEM_NATS_'));
          assert.deepEqual(env.map((e) => [e.name, e.valueFrom?.secretKeyRef?.name, e.valueFrom?.secretKeyRef?.key]), [[`TANDEM_NATS_${role.toUpperCase()}_PASSWORD`, 'tandem-nats-auth', `${role}-password`]], `${name} ${c.name}`);
          pods++;
        }
      }
    }
    assert.equal(pods, 3);
  });

  it('every tandem flag the manifests use exists in `tandem cloud`', async () => {
    const known = new Set(cloudCommand(io).options.map((o) => o.long));
    let checked = 0;
    for (const name of (await readdir(join(INFRA, 'k8s'))).filter((n) => n.endsWith('.yaml'))) {
      for (const doc of readYamlDocuments(await readFile(join(INFRA, 'k8s', name), 'utf8'))) {
        for (const c of containers(doc)) {
          if (!(c.command ?? []).includes('tandem')) continue;
          const args = c.args ?? [];
          assert.equal(args[0], 'cloud', `${name} ${c.name}: runs tandem cloud`);
          for (const arg of args.filter((a) => String(a).startsWith('--'))) {
            assert.ok(known.has(String(arg)), `${name} ${c.name}: ${arg} is not a flag of tandem cloud`);
            checked++;
          }
          const role = args[args.indexOf('--role') + 1];
          assert.ok(role === 'gateway' || role === 'worker', `${name} ${c.name}: --role ${role}`);
        }
      }
    }
    assert.ok(checked >= 10, `${checked} flags checked`);
    assert.equal(known.has('--no-such-flag'), false);
  });

  it('the NATS configurations: one node and three clustered nodes, all with JetStream and the users of auth.conf, valid to nats-server', async () => {
    const single = await readFile(join(INFRA, 'nats', 'single.conf'), 'utf8');
    assert.match(single, /jetstream \{/);
    for (const i of [0, 1, 2]) {
      const conf = await readFile(join(INFRA, 'nats', `cluster-${i}.conf`), 'utf8');
      assert.match(conf, /jetstream \{/);
      assert.match(conf, new RegExp(`server_name: tandem-nats-${i}`));
      assert.equal((conf.match(/nats-route:\/\//g) ?? []).length, 3);
    }
    for (const name of ['single.conf', 'cluster-0.conf', 'cluster-1.conf', 'cluster-2.conf']) {
      const file = join(INFRA, 'nats', name);
      assert.match(await readFile(file, 'utf8'), /^include \.\/auth\.conf$/m, `${name} includes the users`);
      const check = natsConfigCheck(file);
      assert.equal(check.status, 0, `${name}: ${check.output}`);
    }
  });
});
