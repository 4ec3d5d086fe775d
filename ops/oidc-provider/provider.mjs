// A real OpenID Connect provider for Rucher's tests: node-oidc-provider with one confidential
// client and its development login form. `--layout keycloak` mounts it the way Keycloak lays out
// a realm: issuer {base}/realms/{realm}, endpoints under /protocol/openid-connect/.
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: options } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    layout: { type: 'string', default: 'default' },
    realm: { type: 'string', default: 'rucher' },
    'client-id': { type: 'string', default: 'rucher' },
    'client-secret': { type: 'string', default: 'rucher-test-secret' },
    'redirect-uri': { type: 'string', multiple: true, default: [] },
  },
});

// Claims of the accounts the tests log in as; any other login name gets only its subject.
const ACCOUNTS = {
  alice: {
    email: 'alice@example.com',
    email_verified: true,
    given_name: 'Alice',
    family_name: 'Liddell',
    name: 'Alice Liddell',
    preferred_username: 'alice',
    groups: ['admins', 'dev ops'],
    realm_access: { roles: ['operator', 'auditor'] },
  },
};

const keycloak = options.layout === 'keycloak';
const prefix = keycloak ? `/realms/${options.realm}` : '';
const server = http.createServer();
await new Promise((resolve) => { server.listen(Number(options.port), '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${server.address().port}${prefix}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: options['client-id'],
    client_secret: options['client-secret'],
    redirect_uris: options['redirect-uri'],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_post',
  }],
  pkce: { required: () => true },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'given_name', 'family_name', 'preferred_username'],
    groups: ['groups', 'realm_access'],
  },
  async findAccount(ctx, id) {
    return {
      accountId: id,
      async claims() { return { sub: id, ...(ACCOUNTS[id] ?? { preferred_username: id }) }; },
    };
  },
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ['rucher-test-cookie-key'] },
  routes: keycloak ? {
    authorization: '/protocol/openid-connect/auth',
    token: '/protocol/openid-connect/token',
    userinfo: '/protocol/openid-connect/userinfo',
    jwks: '/protocol/openid-connect/certs',
    end_session: '/protocol/openid-connect/logout',
    revocation: '/protocol/openid-connect/revoke',
    introspection: '/protocol/openid-connect/token/introspect',
  } : {},
});
const handle = provider.callback();

server.on('request', (req, res) => {
  if (prefix) {
    if (!req.url.startsWith(prefix)) {
      res.writeHead(404).end();
      return;
    }
    // Mounted as Express would: the provider reads its mount path from originalUrl.
    req.originalUrl = req.url;
    req.url = req.url.slice(prefix.length) || '/';
  }
  handle(req, res);
});

process.stdout.write(`READY ${issuer}\n`);
process.on('SIGTERM', () => server.close(() => process.exit(0)));
