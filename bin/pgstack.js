#!/usr/bin/env node
// The `pgstack` command. The project runs its TypeScript sources directly through tsx
// (no build step to forget); this shim registers the loader and hands over to the CLI.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../adapters/node/cli.ts');
const code = await main(process.argv.slice(2));
if (code >= 0) process.exit(code);
