import { describe, expect, it } from "vitest";
import { CircuitsVisLib, loadCircuitsVis, LOADER_KEY, loadCount, wrapSource } from "../src/circuitsvis";

const fakeLib = { render() {}, AttentionHeads: {} } as unknown as CircuitsVisLib;

describe("circuitsvis loader", () => {
  it("fetches and evaluates the renderer once per page, however many views ask", async () => {
    const win: Record<string, any> = {};
    let fetches = 0;
    let evals = 0;
    const fetchSource = () => {
      fetches++;
      return new Promise<string>((r) => setTimeout(() => r("source"), 5));
    };
    const evaluate = async (src: string) => {
      evals++;
      expect(src).toBe("source");
      return fakeLib;
    };
    const libs = await Promise.all([1, 2, 3].map(() => loadCircuitsVis(fetchSource, evaluate, win)));
    expect(libs.every((l) => l === fakeLib)).toBe(true);
    expect(await loadCircuitsVis(fetchSource, evaluate, win)).toBe(fakeLib); // a later view
    expect([fetches, evals, loadCount(win)]).toEqual([1, 1, 1]);
    expect(win[LOADER_KEY]).toBeDefined();
  });

  it("forgets a failed load so that the next view retries", async () => {
    const win: Record<string, any> = {};
    await expect(loadCircuitsVis(() => Promise.reject(new Error("kernel gone")), async () => fakeLib, win))
      .rejects.toThrow("kernel gone");
    expect(win[LOADER_KEY]).toBeUndefined();
    expect(await loadCircuitsVis(async () => "ok", async () => fakeLib, win)).toBe(fakeLib);
    expect(loadCount(win)).toBe(1);
  });

  it("wraps the IIFE so its global stays private and the library lands under our key", () => {
    const source = '"use strict";var CircuitsVis=(()=>({render(){return 42},AttentionHeads:1}))();\n//# comment';
    const win: Record<string, any> = {};
    // run the wrapped text with `window` bound to a plain object, as a classic script would
    new Function("window", wrapSource(source, "__lib"))(win);
    expect(win.__lib.render()).toBe(42);
    expect("CircuitsVis" in win).toBe(false);
    expect((globalThis as any).CircuitsVis).toBeUndefined();
  });
});
