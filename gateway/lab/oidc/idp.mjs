// Kanmon lab: a real OpenID Connect provider (the `oidc-provider` package) for end-to-end tests.
//
// Started by gateway/lab/oidcprovider.py inside the lab's internet namespace:
//
//     node idp.mjs CONFIG.json
//
// CONFIG.json (written by Python, see oidcprovider.py):
//   { "issuer": "https://idp.test",
//     "listen": {"host": "198.51.100.43", "port": 443},
//     "tls": {"cert": "/path/idp.pem", "key": "/path/idp.key"},
//     "control": {"host": "127.0.0.1", "port": 9999},
//     "client": {"client_id": ..., "client_secret": ..., "redirect_uris": [...],
//                "token_endpoint_auth_method": "client_secret_basic" | "client_secret_post"},
//     "users": {"alice": {"sub", "password", "otp" (optional), "email", "name", "groups": [...]}, ...},
//     "acr": {"password": "urn:kanmon:pwd", "mfa": "urn:kanmon:mfa"} }
//
// What it adds on top of oidc-provider:
//   * our own sign-in pages (password, then a one-time code for users that have one) through the
//     interaction API, with stable element ids for scripted browsers;
//   * consent granted automatically for the registered client;
//   * a test-control HTTP endpoint (plain HTTP, bound inside the namespace only) that switches a
//     "token-mangling mode" for later token responses and returns a log of token requests.
//     The ID token is re-signed with jose using the private key this file generated and handed
//     to the provider, so exactly one thing is wrong in each mode.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import * as jose from 'jose';
import Provider from 'oidc-provider';

const MODES = ['none', 'tamper', 'wrong-aud', 'wrong-iss', 'expired', 'rotate-keys', 'replay-nonce'];
const SIGNING_ALG = 'RS256';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node idp.mjs CONFIG.json');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));

// -- keys ----------------------------------------------------------------------------------
// The provider's signing key and a second key that is only published (and used) once the
// `rotate-keys` mode is switched on, so a relying party meets a kid it has never seen.
async function newSigningKey() {
  const { privateKey } = await jose.generateKeyPair(SIGNING_ALG, { extractable: true, modulusLength: 2048 });
  const jwk = await jose.exportJWK(privateKey);
  jwk.kid = await jose.calculateJwkThumbprint(jwk);
  jwk.alg = SIGNING_ALG;
  jwk.use = 'sig';
  return jwk;
}

function publicPart(jwk) {
  const { kty, n, e, kid, alg, use } = jwk;
  return { kty, n, e, kid, alg, use };
}

const primaryKey = await newSigningKey();
const rotatedKey = await newSigningKey();
let rotatedKeyPublished = false;

// -- test control state ----------------------------------------------------------------------
let mode = 'none';
const tokenLog = [];

// -- accounts ----------------------------------------------------------------------------------
const users = config.users;
const usersBySub = new Map(Object.entries(users).map(([username, u]) => [u.sub, { username, ...u }]));

async function findAccount(_ctx, sub) {
  const user = usersBySub.get(sub);
  if (!user) return undefined;
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        name: user.name,
        preferred_username: user.username,
        email: user.email,
        email_verified: true,
        groups: user.groups,
      };
    },
  };
}

// -- provider ------------------------------------------------------------------------------------
const client = config.client;
const provider = new Provider(config.issuer, {
  clients: [{
    client_id: client.client_id,
    client_secret: client.client_secret,
    redirect_uris: client.redirect_uris,
    post_logout_redirect_uris: client.post_logout_redirect_uris || [],
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: client.token_endpoint_auth_method || 'client_secret_basic',
    id_token_signed_response_alg: SIGNING_ALG,
  }],
  jwks: { keys: [primaryKey] },
  findAccount,
  responseTypes: ['code'],
  pkce: { required: () => true, methods: ['S256'] },
  scopes: ['openid', 'profile', 'email', 'groups'],
  claims: {
    acr: null, amr: null, auth_time: null, iss: null, sid: null,
    // Standalone claims above are returned only when asked for (claims / acr_values parameter);
    // listing them under `openid` puts them into every ID token, as Entra ID and Keycloak do.
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    profile: ['name', 'preferred_username', 'groups'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  acrValues: [config.acr.password, config.acr.mfa],
  // Put the scope's claims into the ID token too (the gateway reads identity from it).
  conformIdTokenClaims: false,
  cookies: { keys: [jose.base64url.encode(crypto.getRandomValues(new Uint8Array(32)))] },
  features: {
    devInteractions: { enabled: false },     // our own pages below
    rpInitiatedLogout: { enabled: true },
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  // Consent is granted automatically: the registered client is the organization's own gateway.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const grant = await ctx.oidc.provider.Grant.find(grantId);
      if (grant) return grant;
    }
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile email groups');
    await grant.save();
    return grant;
  },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error / エラー', `<p id="error-code">${escapeHtml(out.error)}</p>`
      + `<p id="error-description">${escapeHtml(out.error_description || '')}</p>`);
  },
});

// -- token mangling (a Koa middleware around the provider's own routes) -----------------------------
async function resign(token, changeClaims, key) {
  const header = jose.decodeProtectedHeader(token);
  const payload = { ...jose.decodeJwt(token), ...changeClaims(jose.decodeJwt(token)) };
  const signingKey = await jose.importJWK(key, SIGNING_ALG);
  return new jose.SignJWT(payload).setProtectedHeader({ ...header, alg: SIGNING_ALG, kid: key.kid }).sign(signingKey);
}

function flipSignatureByte(token) {
  const [h, p, s] = token.split('.');
  const sig = jose.base64url.decode(s);
  sig[sig.length >> 1] ^= 0x01;
  return `${h}.${p}.${jose.base64url.encode(sig)}`;
}

// The nonce of the ID token issued before the current one: 'replay-nonce' re-signs the new
// token with it, as if an old token (from an earlier sign-in) were replayed to the client.
let previousNonce = null;

async function mangle(idToken, how, staleNonce) {
  const now = Math.floor(Date.now() / 1000);
  switch (how) {
    case 'none': return idToken;
    case 'tamper': return flipSignatureByte(idToken);
    case 'wrong-aud': return resign(idToken, () => ({ aud: 'some-other-client' }), primaryKey);
    case 'wrong-iss': return resign(idToken, () => ({ iss: 'https://evil-idp.test' }), primaryKey);
    case 'expired': return resign(idToken, () => ({ iat: now - 7200, exp: now - 3600 }), primaryKey);
    case 'rotate-keys':
      rotatedKeyPublished = true;
      return resign(idToken, () => ({}), rotatedKey);
    case 'replay-nonce': return resign(idToken, () => ({ nonce: staleNonce ?? 'a-stale-nonce' }), primaryKey);
    default: throw new Error(`unknown mode ${how}`);
  }
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/jwks' && ctx.status === 200 && rotatedKeyPublished) {
    ctx.body = { keys: [...ctx.body.keys, publicPart(rotatedKey)] };
  }
  if (ctx.path !== '/token' || ctx.method !== 'POST') return;
  const entry = {
    t: Date.now() / 1000,
    client_id: ctx.oidc?.client?.clientId ?? null,
    grant_type: ctx.oidc?.params?.grant_type ?? null,
    status: ctx.status,
    mode,
  };
  if (ctx.status === 200 && ctx.body?.id_token) {
    const how = mode;
    const stale = previousNonce;
    previousNonce = jose.decodeJwt(ctx.body.id_token).nonce ?? null;
    ctx.body = { ...ctx.body, id_token: await mangle(ctx.body.id_token, how, stale) };
    entry.id_token_kid = jose.decodeProtectedHeader(ctx.body.id_token).kid;
    entry.id_token_claims = jose.decodeJwt(ctx.body.id_token);
  } else if (ctx.body?.error) {
    entry.error = ctx.body.error;
    entry.error_description = ctx.body.error_description;
  }
  tokenLog.push(entry);
});

// -- sign-in pages ----------------------------------------------------------------------------------
// Tiny on purpose: fixed markup with stable ids (login-form, username, password, login-submit,
// otp-form, otp, otp-submit, cancel) for the scripted browser. escapeHtml is hand-written because
// five replacements do not justify a template engine dependency.
function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

function page(title, body) {
  return `<!doctype html><html lang="ja"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>`
    + `<body><h1>Kanmon Lab IdP</h1><h2 id="title">${escapeHtml(title)}</h2>${body}</body></html>`;
}

function cancelForm(uid) {
  return `<form id="cancel-form" method="post" action="/interaction/${escapeHtml(uid)}/abort">`
    + '<button id="cancel" type="submit">キャンセル / Cancel</button></form>';
}

function loginPage(uid, error) {
  return page('サインイン / Sign in',
    (error ? `<p id="error" role="alert">${escapeHtml(error)}</p>` : '')
    + `<form id="login-form" method="post" action="/interaction/${escapeHtml(uid)}/login">`
    + '<label for="username">ユーザー名 / Username</label><input id="username" name="username" autocomplete="username" autofocus>'
    + '<label for="password">パスワード / Password</label><input id="password" name="password" type="password" autocomplete="current-password">'
    + '<button id="login-submit" type="submit">サインイン / Sign in</button></form>'
    + cancelForm(uid));
}

function otpPage(uid, username, error) {
  return page('確認コード / One-time code',
    `<p id="otp-user">${escapeHtml(username)}</p>`
    + (error ? `<p id="error" role="alert">${escapeHtml(error)}</p>` : '')
    + `<form id="otp-form" method="post" action="/interaction/${escapeHtml(uid)}/otp">`
    + '<label for="otp">確認コード / Code</label><input id="otp" name="otp" inputmode="numeric" autocomplete="one-time-code" autofocus>'
    + '<button id="otp-submit" type="submit">確認 / Verify</button></form>'
    + cancelForm(uid));
}

// Interactions whose password step passed and that now wait for the one-time code.
const awaitingOtp = new Map();   // interaction uid -> username

function send(res, status, type, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store', ...headers });
  res.end(body);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function loginResult(username, withOtp) {
  return {
    login: {
      accountId: users[username].sub,
      amr: withOtp ? ['pwd', 'otp', 'mfa'] : ['pwd'],
      acr: withOtp ? config.acr.mfa : config.acr.password,
      remember: false,
    },
  };
}

async function handleInteraction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return send(res, 400, 'text/plain', 'interaction mismatch');
  const html = (status, body) => send(res, status, 'text/html; charset=utf-8', body);
  if (req.method === 'GET' && !action) {
    if (details.prompt.name !== 'login') {
      // consent is auto-granted by loadExistingGrant; any other prompt just continues.
      return provider.interactionFinished(req, res, {}, { mergeWithLastSubmission: true });
    }
    const pending = awaitingOtp.get(uid);
    return html(200, pending ? otpPage(uid, pending) : loginPage(uid));
  }
  if (req.method !== 'POST') return send(res, 405, 'text/plain', 'method not allowed');
  const form = await readForm(req);
  if (action === 'abort') {
    awaitingOtp.delete(uid);
    return provider.interactionFinished(req, res,
      { error: 'access_denied', error_description: 'the user cancelled the sign-in' }, { mergeWithLastSubmission: false });
  }
  if (action === 'login') {
    const username = form.get('username') || '';
    const user = Object.hasOwn(users, username) ? users[username] : undefined;
    if (!user || user.password !== form.get('password')) {
      return html(401, loginPage(uid, 'ユーザー名またはパスワードが違います / Wrong username or password'));
    }
    if (user.otp) {
      awaitingOtp.set(uid, username);
      return html(200, otpPage(uid, username));
    }
    return provider.interactionFinished(req, res, loginResult(username, false), { mergeWithLastSubmission: false });
  }
  if (action === 'otp') {
    const username = awaitingOtp.get(uid);
    if (!username) return html(400, loginPage(uid, 'もう一度サインインしてください / Sign in again'));
    if (form.get('otp') !== users[username].otp) {
      return html(401, otpPage(uid, username, '確認コードが違います / Wrong code'));
    }
    awaitingOtp.delete(uid);
    return provider.interactionFinished(req, res, loginResult(username, true), { mergeWithLastSubmission: false });
  }
  return send(res, 404, 'text/plain', 'not found');
}

const providerCallback = provider.callback();
const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|otp|abort))?$/;

async function idpHandler(req, res) {
  const match = INTERACTION.exec(new URL(req.url, config.issuer).pathname);
  if (!match) return providerCallback(req, res);
  try {
    await handleInteraction(req, res, match[1], match[2]);
  } catch (err) {
    // e.g. SessionNotFound when the interaction cookie is missing or the interaction expired
    console.error(`interaction ${match[1]}: ${err.name}: ${err.message}`);
    if (!res.headersSent) send(res, 400, 'text/html; charset=utf-8', page('Error / エラー', `<p id="error-code">${escapeHtml(err.name)}</p>`));
  }
}

// -- test control endpoint (plain HTTP, inside the namespace only) -------------------------------------
async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

async function controlHandler(req, res) {
  const json = (status, body) => send(res, status, 'application/json', JSON.stringify(body));
  const path = new URL(req.url, 'http://control').pathname;
  try {
    if (path === '/mode' && req.method === 'GET') return json(200, { mode, modes: MODES });
    if (path === '/mode' && (req.method === 'PUT' || req.method === 'POST')) {
      const wanted = (await readJson(req)).mode;
      if (!MODES.includes(wanted)) return json(400, { error: `unknown mode ${JSON.stringify(wanted)}`, modes: MODES });
      const previous = mode;
      mode = wanted;
      if (mode === 'rotate-keys') rotatedKeyPublished = true;
      console.log(`mode ${previous} -> ${mode}`);
      return json(200, { mode, previous });
    }
    if (path === '/token-log' && req.method === 'GET') return json(200, { requests: tokenLog });
    if (path === '/token-log' && req.method === 'DELETE') {
      tokenLog.length = 0;
      return json(200, { requests: [] });
    }
    if (path === '/keys' && req.method === 'GET') {
      return json(200, { primary_kid: primaryKey.kid, rotated_kid: rotatedKey.kid, rotated_published: rotatedKeyPublished });
    }
    return json(404, { error: 'not found' });
  } catch (err) {
    return json(400, { error: String(err.message || err) });
  }
}

// -- start ---------------------------------------------------------------------------------------------
const tls = { cert: readFileSync(config.tls.cert), key: readFileSync(config.tls.key) };
const idpServer = https.createServer(tls, idpHandler);
const controlServer = http.createServer(controlHandler);

function listen(server, { host, port }) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
}

await listen(idpServer, config.listen);
await listen(controlServer, config.control);
console.log(`idp ready issuer=${config.issuer} listen=${config.listen.host}:${config.listen.port} `
  + `control=${config.control.host}:${config.control.port}`);

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    idpServer.close();
    controlServer.close();
    process.exit(0);
  });
}
