/**
 * Prometheus text exposition for the gateway's counters, in Web APIs only (a Node metrics
 * library would tie the core to Node). Labels are bounded: function names come from the
 * catalog, codes from ERROR_CODES, statuses are grouped by class.
 */

const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

export class Metrics {
  private readonly requests = new Map<string, number>();
  private readonly errors = new Map<string, number>();
  private readonly buckets = new Array<number>(BUCKETS.length).fill(0);
  private readonly cuts = new Map<string, number>();
  private durationSum = 0;
  private durationCount = 0;
  private inflight = 0;

  /** Label strings per function and status class, built once (names come from the catalog). */
  private readonly labelCache = new Map<string, string[]>();

  private labels(fn: string, status: number): string {
    const statusClass = Math.floor(status / 100);
    let byClass = this.labelCache.get(fn);
    if (byClass === undefined) {
      byClass = [];
      this.labelCache.set(fn, byClass);
    }
    return (byClass[statusClass] ??= `function="${escapeLabel(fn)}",status="${statusClass}xx"`);
  }

  requestStarted(): void {
    this.inflight++;
  }

  /** Records one finished request (status as sent, duration until the response head). */
  requestFinished(fn: string, status: number, seconds: number, code?: string): void {
    this.inflight--;
    const key = this.labels(fn, status);
    this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
    if (code) this.errors.set(code, (this.errors.get(code) ?? 0) + 1);
    this.durationSum += seconds;
    this.durationCount++;
    for (let i = 0; i < BUCKETS.length; i++) if (seconds <= (BUCKETS[i] ?? Infinity)) this.buckets[i] = (this.buckets[i] ?? 0) + 1;
  }

  /** A response cut before its end, after its head was sent: by the function (reset, deadline) or the client leaving. */
  responseCut(cause: 'upstream' | 'deadline' | 'client'): void {
    this.cuts.set(cause, (this.cuts.get(cause) ?? 0) + 1);
  }

  /** The exposition text; `extra` lines (the host's catalog gauges) are appended as given. */
  render(extra: string[] = []): string {
    const lines: string[] = [];
    lines.push('# HELP pgstack_requests_total Requests by function and status class (function="": no function was found: health, readiness, metrics, unknown routes and names).');
    lines.push('# TYPE pgstack_requests_total counter');
    for (const [labels, n] of this.requests) lines.push(`pgstack_requests_total{${labels}} ${n}`);
    lines.push('# HELP pgstack_gateway_errors_total Answers the gateway made itself, by code.');
    lines.push('# TYPE pgstack_gateway_errors_total counter');
    for (const [code, n] of this.errors) lines.push(`pgstack_gateway_errors_total{code="${code}"} ${n}`);
    lines.push('# HELP pgstack_responses_cut_total Responses cut after their head: by the function (upstream, deadline) or the client leaving (client).');
    lines.push('# TYPE pgstack_responses_cut_total counter');
    for (const [cause, n] of this.cuts) lines.push(`pgstack_responses_cut_total{cause="${cause}"} ${n}`);
    lines.push('# HELP pgstack_request_duration_seconds Time to the response head.');
    lines.push('# TYPE pgstack_request_duration_seconds histogram');
    BUCKETS.forEach((le, i) => lines.push(`pgstack_request_duration_seconds_bucket{le="${le}"} ${this.buckets[i] ?? 0}`));
    lines.push(`pgstack_request_duration_seconds_bucket{le="+Inf"} ${this.durationCount}`);
    lines.push(`pgstack_request_duration_seconds_sum ${this.durationSum}`);
    lines.push(`pgstack_request_duration_seconds_count ${this.durationCount}`);
    lines.push('# HELP pgstack_requests_in_flight Requests being handled.');
    lines.push('# TYPE pgstack_requests_in_flight gauge');
    lines.push(`pgstack_requests_in_flight ${this.inflight}`);
    return [...lines, ...extra].join('\n') + '\n';
  }
}
