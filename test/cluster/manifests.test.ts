// The deployment files cannot run here: they must parse, and every `tandem` flag they use
// must exist in the command line's definitions (a renamed flag would break a deployment).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { cloudCommand } from '../../cli/cloud.ts';
import { RECOMMENDED_MAX_PAYLOAD } from '../../cloud-node/cluster/wire-spill.ts';
import { NATS_SERVER } from './nats-server.ts';
import { makeRouteCertificates, withRouteCertificates } from './route-certs.ts';
import type { RouteCertificates } from './route-certs.ts';
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
  // nats-server's check reads the route certificates that route-tls.conf names.
  let certs: RouteCertificates;
  before(async () => {
    certs = await makeRouteCertificates(await mkdtemp(join(tmpdir(), 'tandem-route-certs-')));
  });
  after(async () => {
    await rm(certs.dir, { recursive: true, force: true });
  });

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
    assert.equal(nats.data['route-tls.conf'], await readFile(join(INFRA, 'nats', 'route-tls.conf'), 'utf8'), 'the ConfigMap carries infra/nats/route-tls.conf as it is');
    assert.match(nats.data['nats.conf'], /cluster \{[^}]*include \.\/route-tls\.conf/, 'the routes are mutual TLS');
    const set = readYamlDocuments(await readFile(join(INFRA, 'k8s', 'nats.yaml'), 'utf8')).find((d) => (d as { kind?: string }).kind === 'StatefulSet');
    const pod = (set as { spec: { template: { spec: { volumes: { name: string; secret?: { secretName: string } }[]; containers: { volumeMounts: { name: string; mountPath: string }[] }[] } } } }).spec.template.spec;
    const volume = pod.volumes.find((v) => v.secret?.secretName === 'tandem-nats-route-tls');
    assert.ok(volume !== undefined, 'the route certificates come from a Secret');
    assert.equal(pod.containers[0].volumeMounts.find((m) => m.name === volume.name)?.mountPath, '/etc/tandem/nats', 'mounted where route-tls.conf reads them');
    // nats-server itself accepts the ConfigMap's configuration.
    const dir = await mkdtemp(join(tmpdir(), 'tandem-k8s-nats-'));
    try {
      for (const [name, text] of Object.entries(nats.data)) await writeFile(join(dir, name), text.replaceAll('/etc/tandem/nats/', `${certs.dir}/`));
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
    // Each sets the max_payload a gateway expects (it warns below it); nats-server's MB is 1024 * 1024 bytes.
    for (const name of ['single.conf', 'cluster-0.conf', 'cluster-1.conf', 'cluster-2.conf']) {
      const megabytes = /^max_payload: (\d+)MB$/m.exec(await readFile(join(INFRA, 'nats', name), 'utf8'))?.[1];
      assert.equal(Number(megabytes) * 1024 * 1024, RECOMMENDED_MAX_PAYLOAD, `${name}: max_payload ${megabytes}MB`);
    }
    for (const i of [0, 1, 2]) {
      const conf = await readFile(join(INFRA, 'nats', `cluster-${i}.conf`), 'utf8');
      assert.match(conf, /jetstream \{/);
      assert.match(conf, new RegExp(`server_name: tandem-nats-${i}`));
      assert.equal((conf.match(/nats-route:\/\//g) ?? []).length, 3);
      assert.match(conf, /cluster \{[^}]*include \.\/route-tls\.conf/, `cluster-${i}.conf: the routes are mutual TLS`);
    }
    // Checked where the route certificates are: the files of infra/nats, with their folder moved.
    const dir = await mkdtemp(join(tmpdir(), 'tandem-infra-nats-'));
    try {
      for (const name of (await readdir(join(INFRA, 'nats'))).filter((n) => n.endsWith('.conf'))) await writeFile(join(dir, name), await withRouteCertificates(join(INFRA, 'nats', name), certs));
      for (const name of ['single.conf', 'cluster-0.conf', 'cluster-1.conf', 'cluster-2.conf']) {
        assert.match(await readFile(join(dir, name), 'utf8'), /^include \.\/auth\.conf$/m, `${name} includes the users`);
        const check = natsConfigCheck(join(dir, name));
        assert.equal(check.status, 0, `${name}: ${check.output}`);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
