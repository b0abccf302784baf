#!/usr/bin/env node
// Runs the TypeScript sources directly: a fresh clone needs `npm ci` and nothing else.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
