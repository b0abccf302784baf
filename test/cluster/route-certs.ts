// Certificates for the routes of a test NATS cluster, made with openssl as infra/nats/route-tls.conf
// says: the cluster's CA, one route certificate for 127.0.0.1 and the route names of
// infra/nats and infra/k8s, and an intruder's certificate from a CA of its own.
import { execFileSync } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** Where the configurations in infra/ expect the route certificates. */
export const ROUTE_CERT_DIR = '/etc/tandem/nats/';

export interface RouteCertificates {
  dir: string;
  /** route.pem, route-key.pem, route-ca.pem as route-tls.conf names them. */
  ca: string;
  cert: string;
  key: string;
  intruderCert: string;
  intruderKey: string;
}

export async function makeRouteCertificates(dir: string): Promise<RouteCertificates> {
  const openssl = (...args: string[]): void => {
    execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  };
  const names = ['IP:127.0.0.1', 'DNS:localhost', ...[0, 1, 2].flatMap((i) => [`DNS:tandem-nats-${i}`, `DNS:tandem-nats-${i}.tandem-nats`])];
  await writeFile(join(dir, 'san.ext'), `subjectAltName=${names.join(',')}\n`);
  for (const [ca, cert] of [['route-ca', 'route'], ['intruder-ca', 'intruder']]) {
    openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${ca}.key`, '-out', `${ca}.pem`, '-days', '2', '-subj', `/CN=${ca}`);
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${cert}-key.pem`, '-out', `${cert}.csr`, '-subj', '/CN=tandem-nats-route');
    openssl('x509', '-req', '-in', `${cert}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${cert}.pem`, '-days', '2', '-extfile', 'san.ext');
  }
  return {
    dir, ca: join(dir, 'route-ca.pem'), cert: join(dir, 'route.pem'), key: join(dir, 'route-key.pem'),
    intruderCert: join(dir, 'intruder.pem'), intruderKey: join(dir, 'intruder-key.pem'),
  };
}

/** A configuration file of infra/ with the route certificates' folder moved to `certs.dir`. */
export async function withRouteCertificates(file: string, certs: RouteCertificates): Promise<string> {
  return (await readFile(file, 'utf8')).replaceAll(ROUTE_CERT_DIR, `${certs.dir}/`);
}
